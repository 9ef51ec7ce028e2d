"""Exported dashboards render in a real headless browser (Debian's Chromium, driven by Playwright) with
the network blocked: the plot draws its data points and the console shows no errors.

``.ci/run`` installs Chromium and sets ``CI``, so there the test cannot skip (nor with
``CODI_LENS_REQUIRE_BROWSER=1``); on another machine without Chromium it is skipped with the reason."""

from __future__ import annotations

import os
import shutil

import pytest
from conftest import skip_unless_ci

from codi_lens import load_pretrained
from codi_lens.data import load_problems
from codi_lens.lens import thought_states, top_decodes
from codi_lens.plotting import recovery_slider, thought_decode_grid, write_html

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]  # fmt: skip


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None or not _has_playwright():
        if os.environ.get("CODI_LENS_REQUIRE_BROWSER"):
            pytest.fail("CODI_LENS_REQUIRE_BROWSER is set but Chromium or Playwright is missing")
        skip_unless_ci("no Chromium (apt-get install chromium) or no playwright package")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        launched = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield launched
        launched.close()


def _has_playwright() -> bool:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return False
    return True


def _open_offline(browser, path):
    """Open ``path`` with every non-file request aborted; returns the page, console errors and the
    requests that tried to leave the machine."""
    page = browser.new_page()
    errors, outside = [], []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))

    def route(r):
        if r.request.url.startswith("file://"):
            r.continue_()
        else:
            outside.append(r.request.url)
            r.abort()

    page.route("**/*", route)
    page.goto(path.as_uri())
    page.wait_for_selector(".main-svg", timeout=20_000)
    return page, errors, outside


@pytest.fixture(scope="module")
def dashboards(tmp_path_factory):
    model = load_pretrained()
    problems = load_problems("toy-chain:test", limit=2)
    states = thought_states(model, problems, progress=False)
    decodes = top_decodes(model, states.residuals[:1], [problems[0].id], k=5)
    out = tmp_path_factory.mktemp("html")
    write_html(thought_decode_grid(decodes, [f"{v:g}" for v in problems[0].intermediates]), out / "decodes.html")
    import pandas as pd

    rows = pd.DataFrame(
        {"layer": [0, 0, 1, 1], "position": ["bot", "thought:1"] * 2, "recovery": [0.1, 0.4, 0.7, 0.3], "pair_id": "p"}
    )
    write_html(recovery_slider(rows, ["bot", "thought:1"]), out / "slider.html")
    return out


def test_heatmap_dashboard_renders_offline_without_console_errors(browser, dashboards):
    page, errors, outside = _open_offline(browser, dashboards / "decodes.html")
    cells = page.evaluate("document.querySelectorAll('.main-svg .heatmaplayer image').length")
    labels = page.evaluate("Array.from(document.querySelectorAll('.main-svg text')).map(t => t.textContent)")
    assert cells >= 1  # the heatmap's image of 3 x 7 cells
    assert any(label.startswith("★") for label in labels)  # a thought decodes to an intermediate value
    assert errors == [] and outside == []


def test_slider_moves_the_bars(browser, dashboards):
    page, errors, outside = _open_offline(browser, dashboards / "slider.html")
    bars = page.evaluate("document.querySelectorAll('.main-svg .bars .point').length")
    assert bars == 2
    first = page.evaluate(
        "Array.from(document.querySelectorAll('.main-svg .bars .point path')).map(p => p.getAttribute('d'))"
    )
    rail = page.locator(".slider-container .slider-rail-touch-rect").first
    box = rail.bounding_box()
    rail.click(position={"x": box["width"] - 4, "y": box["height"] / 2})  # the slider's right end: layer 1
    # Wait for the redraw itself (bars whose paths changed), not for a fixed time.
    page.wait_for_function(
        "(first) => JSON.stringify(Array.from(document.querySelectorAll('.main-svg .bars .point path'))"
        ".map(p => p.getAttribute('d'))) !== JSON.stringify(first)",
        arg=first,
        timeout=20_000,
    )
    assert page.evaluate("document.querySelector('.js-plotly-plot')._fullLayout.sliders[0].active") == 1
    second = page.evaluate(
        "Array.from(document.querySelectorAll('.main-svg .bars .point path')).map(p => p.getAttribute('d'))"
    )
    assert second != first  # layer 1's recoveries are drawn
    assert errors == [] and outside == []


def test_a_page_of_several_figures_draws_each_offline(browser, tmp_path):
    """``write_page`` (the feature report's page): plotly.js embedded once, every figure drawn, tables and text
    in place, nothing fetched from the network."""
    import pandas as pd
    import plotly.express as px

    from codi_lens.plotting import write_page

    figures = [px.scatter(x=[1, 2, 3], y=[3, 1, 2]), px.bar(x=["a", "b"], y=[1, 2])]
    table = pd.DataFrame({"feature_id": ["thought.3.hook_hidden/4"], "effect": [0.25]})
    write_page("page", [("first", [figures[0], "a reading"]), ("second", [figures[1], table])], tmp_path / "page.html")
    html = (tmp_path / "page.html").read_text()
    assert html.count("<script>") == 1 + len(figures)  # the library once, one call per figure
    page, errors, outside = _open_offline(browser, tmp_path / "page.html")
    page.wait_for_function("document.querySelectorAll('.js-plotly-plot .main-svg').length >= 2", timeout=20_000)
    assert page.evaluate("document.querySelectorAll('.js-plotly-plot').length") == len(figures)
    assert page.evaluate("document.querySelectorAll('.main-svg .bars .point').length") == 2
    assert "thought.3.hook_hidden/4" in page.inner_text("table") and "a reading" in page.inner_text("body")
    assert errors == [] and outside == []


@pytest.mark.parametrize("checkpoint", ["toy-chain", "toy-arith"])
def test_the_report_page_draws_every_section_offline(browser, tmp_path, checkpoint):
    """``experiments.report`` on each shipped model: every section's figure drawn with the network blocked, no
    console error, the plan and the published findings in place."""
    from experiments import report

    flags = [
        "--checkpoint",
        checkpoint,
        "--limit",
        "16",
        "--problems",
        "32",
        "--max-new-tokens",
        "16",
        "--parts",
        "accuracy,step_importance,reading" if checkpoint == "toy-chain" else "accuracy,patching",
    ]
    report.main([*flags, "--out", str(tmp_path)])
    page, errors, outside = _open_offline(browser, tmp_path / "report.html")
    figures = (tmp_path / "report.html").read_text().count('class="plotly-graph-div"')
    assert figures >= (5 if checkpoint == "toy-chain" else 2)  # toy-chain: accuracy, importance, lens, early, values
    page.wait_for_function(
        f"document.querySelectorAll('.js-plotly-plot .main-svg').length >= {figures}", timeout=30_000
    )
    assert page.evaluate("document.querySelectorAll('.main-svg .bars .point').length") > figures
    headings = page.evaluate("Array.from(document.querySelectorAll('h2')).map(h => h.textContent)")
    assert headings[:2] == [
        "Plan: parts, units, estimated and actual minutes",
        "Published findings beside this checkpoint",
    ]
    assert ("Early answers" in headings or checkpoint != "toy-chain") and "Cywinski" in page.inner_text("body")
    assert errors == [] and outside == []
