"""``experiments.report``: every headline on the page is its part's own table's number (recomputed here from the
part's raw rows where it can be), a killed report resumes to the same numbers, and the budget is shared as the
planner's rule says, by hand."""

from __future__ import annotations

import html
import json
from pathlib import Path

import pandas as pd
import pytest

import codi_lens.reports.report as report_module
from codi_lens.core.errors import FlagError
from codi_lens.reports.report import PlannedPart, share_budget
from experiments import report as report_command

FLAGS = ["--limit", "16", "--problems", "40", "--max-new-tokens", "16", "--batch-size", "16"]


@pytest.fixture(scope="module")
def toy_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    record = report_command.main([*FLAGS, "--out", str(out)])
    return out, record


def test_every_headline_is_its_part_s_own_number(toy_report):
    out, record = toy_report
    saved = json.loads((out / "report.json").read_text())
    headlines = saved["headlines"]
    assert saved["readings"] == record["readings"]
    # accuracy: recomputed from the part's raw answers, not from its table
    answers = pd.read_parquet(out / "parts/accuracy/results.parquet")
    for condition, key in (("latents", "accuracy"), ("zero_all_thoughts", "accuracy_thoughts_zeroed")):
        share = answers[answers["condition"] == condition]["correct"].mean()
        assert headlines["Accuracy with and without the thoughts"][key][0] == pytest.approx(share, abs=1e-4)
    # step importance: the share of right answers broken, from the part's raw rows
    rows = pd.read_parquet(out / "parts/step_importance/results.parquet")
    zero3 = rows[(rows["intervention"] == "zero") & (rows["scope"] == "single") & (rows["thought"] == 3)]
    right = zero3[zero3["baseline_correct"]]
    assert headlines["Step importance"]["zero/single/thought 3"][0] == pytest.approx(
        (~right["correct"]).mean(), abs=1e-4
    )
    # patching: the best site is the table's largest mean recovery
    cells = pd.read_parquet(out / "parts/patching/cells.parquet")
    best = cells.loc[cells["recovery"].idxmax()]
    patched = headlines["Minimal-pair patching"][f"{best['hook']}@{best['position']}"]
    assert patched[0] == pytest.approx(best["recovery"], abs=1e-4)
    # early answers: each k from the part's table
    early = pd.read_parquet(out / "parts/reading/early_answers.parquet")
    for r in early[early["group"] == "all"].itertuples():
        assert headlines["Early answers"][f"after thought {r.k}"][0] == pytest.approx(r.mean, abs=1e-4)
    # the page shows every reading and the published rows computed from these headlines
    page = (out / "report.html").read_text()
    for lines in saved["readings"].values():
        for line in filter(None, lines):
            assert html.escape(line) in page
    assert "97.1%" in page and "Cywinski" in page and "Scratchpad" in page
    assert page.count("<h2>") == 2 + sum(1 for _ in saved["readings"])


def test_a_killed_report_resumes_to_the_same_numbers(tmp_path, monkeypatch):
    flags = ["--limit", "8", "--problems", "20", "--max-new-tokens", "16", "--parts", "accuracy,patching,chained"]
    whole = report_command.main([*flags, "--out", str(tmp_path / "whole")])
    original = report_module.run_part

    def killed(part, *args, **kwargs):
        if part.name == "chained":
            raise KeyboardInterrupt
        return original(part, *args, **kwargs)

    monkeypatch.setattr(report_module, "run_part", killed)
    with pytest.raises(KeyboardInterrupt):
        report_command.main([*flags, "--out", str(tmp_path / "killed")])
    assert not (tmp_path / "killed/report.json").exists()
    assert (tmp_path / "killed/parts/patching/part.json").exists()
    monkeypatch.setattr(report_module, "run_part", original)
    resumed = report_command.main([*flags, "--out", str(tmp_path / "killed")])
    for key in ("headlines", "readings", "references"):
        assert resumed[key] == whole[key]


def test_the_budget_is_shared_equally_and_a_cheap_part_leaves_the_rest_to_the_others():
    parts = [
        PlannedPart("accuracy", "problems", 100, 0, fixed_s=10, per_unit_s=1),
        PlannedPart("patching", "pairs", 100, 0, fixed_s=10, per_unit_s=1),
        PlannedPart("chained", "pairs", 100, 0, fixed_s=0, per_unit_s=0.1),
    ]
    share_budget(parts, 150)
    # chained needs 10 s for all 100 pairs; the other two share 140 s: (70 - 10) / 1 = 60 units each
    assert [p.n for p in parts] == [60, 60, 100] and not any(p.skipped for p in parts)
    tight = [PlannedPart("accuracy", "problems", 100, 0, fixed_s=10, per_unit_s=1)]
    share_budget(tight, 12)  # 2 units fit; the part's minimum is 4
    assert tight[0].skipped and "minimum (4 problems)" in tight[0].skipped


def test_budget_flag():
    assert report_command.parse_budget("15m") == 900
    assert report_command.parse_budget("90s") == 90
    assert report_command.parse_budget("1h") == 3600
    assert report_command.parse_budget("2") == 120
    with pytest.raises(FlagError, match="--budget"):
        report_command.parse_budget("soon")
    with pytest.raises(FlagError, match="--budget .* or --limit"):
        report_command.main(["--out", "/tmp/never"])


def test_docs_findings_blocks_are_the_report_s_readings_and_numbers(toy_report):
    from docs.regenerate import DOCS, PAGES, findings_block, report_block, rewrite

    _, record = toy_report
    block = findings_block(record, "step_importance")
    assert " ".join(record["readings"]["Step importance"]) in block
    key, first = next(iter(record["headlines"]["Step importance"].items()))
    assert f"| {key} | {first[0]:.3g} [{first[1]:.3g}, {first[2]:.3g}] |" in block
    assert "Not generated" in findings_block(record, "features")  # no SAEs given: skipped, and it says why
    page = "intro\n<!-- findings:step_importance -->\nold numbers\n<!-- /findings -->\nkept\n"
    assert rewrite(page, {"step_importance": block}) == (
        "intro\n<!-- findings:step_importance -->\n" + block + "<!-- /findings -->\nkept\n"
    )
    assert "97.1%" in report_block(record)
    for part, name in [*PAGES.items(), ("report", "report.md")]:  # every page has the block regenerate fills
        assert f"<!-- findings:{part} -->" in (DOCS / name).read_text(), name


def test_a_part_folder_made_for_other_units_is_started_again(tmp_path):
    from codi_lens.reports.report import start_part

    folder = tmp_path / "patching"
    start_part(folder, ["pair:1", "pair:2"])
    (folder / "results.parquet").write_text("rows for pairs 1 and 2")
    start_part(folder, ["pair:1", "pair:2"])  # the same units: what is there is kept (a resumed run)
    assert (folder / "results.parquet").exists()
    start_part(folder, ["pair:1", "pair:3"])  # other units: its stores would not match them
    assert not (folder / "results.parquet").exists()
    assert json.loads((folder / "part.json").read_text())["n"] == 2


def test_a_summary_block_lists_a_command_s_numbers_with_their_intervals():
    from docs.regenerate import summary_block

    block = summary_block({"n_pairs": 12, "recovery": {"thought 3": [0.5, 0.25, 0.75]}, "wall_seconds": 3.2}, "x")
    assert "| n_pairs | 12 |" in block and "| recovery/thought 3 | 0.5 [0.25, 0.75] |" in block
    assert "wall_seconds" not in block and "`python -m experiments.x`" in block
    ranked = {"top": [{"head": "L1H2", "contribution": [0.9, 0.8, 1.0], "bh_q": 0.001}]}
    block = summary_block(ranked, "y", ["a reading"], limit=1)
    assert "| top/L1H2/contribution | 0.9 [0.8, 1] |" in block and "- a reading" in block
    assert "The first 1 of 2 numbers" in block  # the q value is left out, and the block says so


def test_docs_readings_count_what_the_numbers_say(tmp_path):
    """The readings ``docs.regenerate`` writes above a command's numbers, on summaries worked out by hand."""
    from docs.regenerate import _feature_report_reading, _pairs_reading

    interaction = {  # the CI above 0 and BH-significant; below 0 and significant; above 0 but not significant
        "zero/pairs/1,2": {"logprob_interaction": [2.0, 1.5, 2.5], "bh_q": 0.01, "breaks_only_together": 0.05},
        "zero/pairs/1,3": {"logprob_interaction": [-1.0, -1.5, -0.5], "bh_q": 0.01, "breaks_only_together": 0.0},
        "zero/pairs/2,3": {"logprob_interaction": [0.5, 0.1, 0.9], "bh_q": 0.2, "breaks_only_together": 0.0},
    }
    single = pd.DataFrame(
        {
            "intervention": ["zero", "zero", "zero"],
            "scope": ["single", "single", "pairs"],
            "thought": [1, 2, 1],
            "importance": [0.7, 0.2, 0.9],
            "importance_low": [0.6, 0.1, 0.8],
            "importance_high": [0.8, 0.3, 1.0],
            "n_draws": [2, 2, 2],
            "importance_draw_sd": [0.01, 0.03, 0.5],
        }
    )
    single.to_parquet(tmp_path / "importance.parquet")
    lines = _pairs_reading({"set_interactions": {"n_problems": 9, **interaction}}, tmp_path)
    assert lines[0].startswith("`zero`: 1 of 3 pairs cost less together") and "and 1 cost more" in lines[0]
    assert "from -1.00 to +2.00 nats" in lines[0] and "at most 5.0%" in lines[0]
    assert "the most right answers at thought 1 (0.7 [0.6, 0.8]) and the fewest at thought 2" in lines[1]
    assert "across the 2 draws, the SD of the mean is 0.010-0.030." in lines[1]  # the pairs row left out
    share = {"share": 0.5, "low": 0.25, "high": 0.75, "n": 4}
    summary = {
        "n_causal": 4,
        "n_screened": 40,
        "orphan_ids": 0,
        "encodes_own_step": {"causal": share, "not_causal": share},
        "best_step_is_own": {"causal": share, "not_causal": share, "shuffled": share},
        "pathways": {"tested": 30, "validated": 12, "adjacent_tested": 20, "adjacent_validated": 10},
    }
    last = _feature_report_reading(summary, Path("-"))[-1]
    # 10 of 20 adjacent against 2 of 10 that skip: the two-sided hypergeometric sum over tables as rare as
    # [[10, 10], [2, 8]] (12 validated of 30) is 0.2353, worked out with math.comb
    assert "10 of 20 from thought j to j+1, 2 of 10 that skip a thought (Fisher p = 0.24)" in last, last


def test_the_attention_reading_claims_nothing_a_ci_does_not_show():
    """Four problems at the real shape gave a Spearman with no bootstrap CI: the reading says there is none, and
    a control that correlates nowhere is not read as "problem-specific" when the checkpoint does not either."""
    from codi_lens.reports.battery import attention_reading

    nan = float("nan")
    own = pd.DataFrame(
        {"layer": [0, 1], "spearman": [0.89, 0.1], "spearman_low": [nan, -0.5], "spearman_high": [nan, 0.6]}
    )
    control = own.assign(spearman=[0.2, 0.1])
    first, second = attention_reading(own, control)
    assert "layer 0, Spearman 0.89 (no CI: too few problems); 0 of 2 layers" in first, first
    assert second.endswith("0 of 2 layers do."), second
    own.loc[1, ["spearman_low", "spearman_high"]] = [0.05, 0.2]  # now layer 1 excludes zero; the control does not
    assert attention_reading(own, control)[1].endswith("what correlates is problem-specific."), own
