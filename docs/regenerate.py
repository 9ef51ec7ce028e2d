"""Rebuild the findings of the docs pages on the default model from a fresh run of the report.

    python -m docs.regenerate [--out results/docs_report] [--limit 200] [--saes DIR] [--all] [--check]

Runs ``experiments.report`` on ``toy-chain`` (the first ``--problems`` test problems, every part on ``--limit`` of
them; resumable) and rewrites, in each page that documents a part, the block between ``<!-- findings:<part> -->``
and ``<!-- /findings -->``: the run's readings (generated from its numbers) and its headline numbers with their
95% CIs. ``docs/report.md`` gets the plan and the published findings beside toy-chain's. With Chromium and
Playwright installed, ``docs/img/report.png`` is a screenshot of the page's first screen. ``--all`` also trains
the SAEs (unless ``--saes``), runs the commands of the pages the report does not cover (:data:`RUNS`), fills their
``<!-- findings:run_<command> -->`` blocks from each run's ``summary.json``, and screenshots every figure the
docs show into ``docs/img/``. ``--check`` rewrites nothing and exits with status 1 when a page's block differs
from what the run gives (a stale page).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path
from typing import Any

DOCS = Path(__file__).resolve().parent
#: The page that documents each part of the report, and the sections of the part it shows.
PAGES = {
    "accuracy": "toy_model_report.md",
    "step_importance": "step_importance.md",
    "attention": "ablation_attention.md",
    "patching": "position_patching.md",
    "routes": "route_patching.md",
    "chained": "iterative_patching.md",
    "reading": "read_thoughts.md",
    "features": "feature_screen.md",
}
#: Which report sections belong to which part (a part may write several).
SECTIONS = {
    "accuracy": ["Accuracy with and without the thoughts"],
    "step_importance": ["Step importance"],
    "attention": ["Attention to the thoughts vs their importance"],
    "patching": ["Minimal-pair patching"],
    "routes": ["Route patching: recurrence or attention"],
    "chained": ["Chained vs parallel patching"],
    "reading": ["Logit and tuned lens readout", "Linear probes", "Early answers", "Value-matched patching"],
    "features": ["Causal SAE features"],
}
#: With ``--all``: the commands of the pages the report does not cover, in order (later ones read earlier ones'
#: outputs under ``<out>/runs/``; ``{runs}`` and ``{parts}`` are filled in), and the figures they give the docs.
RUNS = {
    "train_saes": (
        "--architectures topk --d-sae 256 --k 8 --train-limit 4000 --limit 200 --sites "
        + ",".join(f"thought.{k}.hook_hidden" for k in range(1, 7)),
        {"sae_quality.html": "train_saes.png"},
    ),
    "step_importance": (
        "--interventions zero,mean --scopes single,pairs --limit 200",
        {"pairs_zero.html": "step_importance_pairs.png"},
    ),
    "ablation_attention": (
        "--limit 200",
        {"thought_to_thought.html": "thought_to_thought.png", "question_to_thought.html": "question_to_thought.png"},
    ),
    "route_patching": ("--limit 200", {"attention_by_layer.html": "route_patching_layers.png"}),
    "logit_attribution": (
        "--limit 200",
        {"parts.html": "logit_attribution.png", "sources.html": "logit_attribution_sources.png"},
    ),
    "path_patching": ("--limit 200", {"paths.html": "path_patching.png"}),
    "sae_features": ("--saes {runs}/train_saes --limit 200", {"dashboard_*.html": "sae_features.png"}),
    "feature_pathways": (
        "--saes {runs}/train_saes --targets causal --screen {parts}/features --limit 200 --candidates 20",
        {"pathways.html": "feature_pathways_targets.png"},
    ),
    "feature_report": (
        "--screen {parts}/features --pathways {runs}/feature_pathways --features {runs}/sae_features "
        "--saes {runs}/train_saes",
        {"report.html": "feature_report.png"},
    ),
}
#: The figures of the report's own parts that the docs show.
PART_FIGURES = {
    "step_importance/importance.html": "step_importance.png",
    "attention/attention_vs_importance.html": "ablation_attention.png",
    "patching/heatmap.html": "position_patching.png",
    "routes/routes.html": "route_patching.png",
    "chained/trajectories.html": "iterative_patching.png",
    "reading/readout_logit.html": "read_thoughts.png",
    "features/screen.html": "feature_screen.png",
}
BLOCK = re.compile(r"(<!-- findings:(?P<part>[a-z_]+) -->\n)(?P<body>.*?)(<!-- /findings -->)", re.S)


def _number(values: Any) -> str:
    if isinstance(values, list) and len(values) == 3:
        return f"{values[0]:.3g} [{values[1]:.3g}, {values[2]:.3g}]"
    return str(values)


def findings_block(record: dict[str, Any], part: str) -> str:
    """The generated text of ``part``: where it comes from, each section's reading and, folded, every headline
    number of its sections."""
    plan = {row["part"]: row for row in record["plan"]}
    row = plan.get(part)
    if row is None or row["skipped"]:
        reason = row["skipped"] if row else "not run"
        return f"*Not generated: the part was skipped ({reason}).*\n"
    lines = [
        f"**On toy-chain** ({row['units']} {row['unit']}, float32, CPU; generated by `python -m docs.regenerate` "
        "from the run's own tables; 95% CIs over problems or pairs):",
        "",
    ]
    for title in SECTIONS[part]:
        if title not in record["readings"]:
            continue
        reading = " ".join(line for line in record["readings"][title] if line)
        lines.append(f"- *{title}.* {reading}")
    lines.append("")
    for title in SECTIONS[part]:
        numbers = [(k, v) for k, v in record["headlines"].get(title, {}).items() if isinstance(v, list)]
        if numbers:
            lines += [f"<details><summary>{title}: every headline number</summary>", ""]
            lines += [f"| {title} | value [95% CI] |", "|---|---|"]
            lines += [f"| {key} | {_number(value)} |" for key, value in numbers]
            lines += ["", "</details>", ""]
    return "\n".join(lines)


def report_block(record: dict[str, Any]) -> str:
    """``docs/report.md``'s generated part: the plan and the published findings beside toy-chain's."""
    lines = ["| part | units | skipped |", "|---|---|---|"]
    lines += [f"| {r['part']} | {r['units']} {r['unit']} | {r['skipped']} |" for r in record["plan"]]
    lines += ["", "| source | finding | published | toy-chain |", "|---|---|---|---|"]
    lines += [
        f"| {r['source']} | {r['finding']} | {r['published']} | {r['this checkpoint']} |" for r in record["references"]
    ]
    return "\n".join(lines) + "\n"


def rewrite(text: str, blocks: dict[str, str]) -> str:
    """``text`` with the body of every ``findings:<part>`` block replaced by ``blocks[part]`` (others kept)."""

    def replace(match: re.Match) -> str:
        body = blocks.get(match["part"], match["body"])
        return match[1] + body + match[4]

    return BLOCK.sub(replace, text)


def summary_block(summary: dict[str, Any], command: str, *, limit: int = 40) -> str:
    """A generated block from a command's ``summary.json``: the command, then its numbers (a value with a CI as
    ``m [low, high]``), folded; at most ``limit`` rows."""
    rows = []

    def walk(value: Any, key: str) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{key}/{k}" if key else str(k))
        elif isinstance(value, list) and len(value) == 3 and all(isinstance(x, (int, float)) for x in value):
            rows.append((key, _number(value)))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and not key.startswith("wall_"):
            rows.append((key, f"{value:.4g}"))

    walk(summary, "")
    lines = [
        f"**On toy-chain**, generated by `python -m docs.regenerate --all` from `python -m experiments.{command}`'s "
        "`summary.json` (float32, CPU):",
        "",
        "<details><summary>the run's numbers</summary>",
        "",
        "| number | value |",
        "|---|---|",
        *(f"| {key} | {value} |" for key, value in rows[:limit]),
        "",
        "</details>",
        "",
    ]
    return "\n".join(lines)


def run_commands(out: Path, saes: str | None) -> dict[str, str]:
    """Every command of :data:`RUNS` (resumable), each page's generated block by its name."""
    import importlib

    runs, parts = out / "runs", out / "parts"
    blocks = {}
    for name, (flags, _) in RUNS.items():
        if not (name == "train_saes" and saes):  # given: the SAEs the report screened (main trains them first)
            text = flags.format(runs=runs, parts=parts).replace(f"{runs}/train_saes", saes or f"{runs}/train_saes")
            argv = [*text.split(), "--out", str(runs / name)]
            print(f"docs: python -m experiments.{name} {' '.join(argv)}", file=sys.stderr)
            importlib.import_module(f"experiments.{name}").main(argv)
        summary = runs / name / "summary.json"
        if summary.exists():
            blocks[f"run_{name}"] = summary_block(json.loads(summary.read_text()), name)
    return blocks


def figures(out: Path) -> list[str]:
    """Screenshots of the report's parts' figures and the commands' figures into ``docs/img/``."""
    done = []
    pairs = [(out / "parts" / html, image) for html, image in PART_FIGURES.items()]
    for name, (_, shots) in RUNS.items():
        for pattern, image in shots.items():
            found = sorted((out / "runs" / name).glob(pattern))
            pairs += [(found[0], image)] if found else []
    for html, image in pairs:
        if html.exists() and screenshot(html, DOCS / "img" / image, viewport=(1200, 800)):
            done.append(f"img/{image}")
    return done


def screenshot(page: Path, image: Path, viewport: tuple[int, int] = (1250, 1400)) -> bool:
    """The first screen of ``page`` as a PNG, when Chromium and Playwright are here."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        return False
    if chromium is None:
        return False
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        view = browser.new_page(viewport={"width": viewport[0], "height": viewport[1]})
        view.goto(page.as_uri())
        view.wait_for_selector(".main-svg", timeout=30_000)
        view.screenshot(path=str(image))
        browser.close()
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="results/docs_report", help="the report's folder (resumable)")
    parser.add_argument("--limit", type=int, default=200, help="problems or pairs per part")
    parser.add_argument("--problems", type=int, default=300, help="test problems read (pairs are made from them)")
    parser.add_argument("--saes", default=None, help="SAEs on toy-chain's thoughts (train_saes --out) for features")
    parser.add_argument("--check", action="store_true", help="rewrite nothing; exit 1 if a page is stale")
    parser.add_argument(
        "--all",
        action="store_true",
        help="also train SAEs (unless --saes), run the commands of the other pages and screenshot every figure",
    )
    args = parser.parse_args(argv)
    from experiments import report, train_saes

    out = Path(args.out)
    saes = args.saes
    if args.all and not saes:
        flags, _ = RUNS["train_saes"]
        train_saes.main([*flags.split(), "--out", str(out / "runs" / "train_saes")])
        saes = str(out / "runs" / "train_saes")
    flags = ["--limit", str(args.limit), "--problems", str(args.problems), "--out", args.out]
    record = report.main(flags + (["--saes", saes] if saes else []))
    blocks = {part: findings_block(record, part) for part in PAGES}
    blocks["report"] = report_block(record)
    if args.all:
        blocks |= run_commands(out, saes)
    stale = []
    for page in sorted(path.name for path in DOCS.glob("*.md")):
        path = DOCS / page
        old = path.read_text()
        new = rewrite(old, blocks)
        if new != old:
            stale.append(page)
            if not args.check:
                path.write_text(new)
    if not args.check and screenshot(out / "report.html", DOCS / "img" / "report.png"):
        stale.append("img/report.png")
    if args.all and not args.check:
        stale += figures(out)
    (Path(args.out) / "docs_blocks.json").write_text(json.dumps(blocks, indent=1))
    print(("stale: " if args.check else "rewrote: ") + (", ".join(stale) or "nothing"))
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
