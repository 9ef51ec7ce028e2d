"""Rebuild the findings of the docs pages on the default model from a fresh run of the report.

    python -m docs.regenerate [--out results/docs_report] [--limit 200] [--saes DIR] [--all] [--check]

Runs ``experiments.report`` on ``toy-chain`` (the first ``--problems`` test problems, every part on ``--limit`` of
them; resumable) and rewrites, in each page that documents a part, the block between ``<!-- findings:<part> -->``
and ``<!-- /findings -->``: the run's readings (generated from its numbers) and its headline numbers with their
95% CIs. ``docs/report.md`` gets the plan and the published findings beside toy-chain's. With Chromium and
Playwright installed, ``docs/img/report.png`` is a screenshot of the page's first screen. ``--all`` also trains
the SAEs (unless ``--saes``), runs the commands of the pages the report does not cover (:data:`RUNS`), fills their
``<!-- findings:run_<name> -->`` blocks from each run's ``summary.json`` (with readings generated from its numbers,
:data:`READERS`), and screenshots every figure the docs show into ``docs/img/``. The ``card`` block quotes the
shipped model's ``card.json``. ``--check`` rewrites nothing and exits with status 1 when a page's block differs
from what the run gives (a stale page).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from collections.abc import Sequence
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
#: With ``--all``: runs of the commands the report does not cover, by the name of their block, in order (later
#: ones read earlier ones' outputs under ``<out>/runs/``; ``{runs}`` and ``{parts}`` are filled in): the command,
#: its flags and the figures it gives the docs.
RUNS = {
    "toy_model_report": ("toy_model_report", "--limit 200", {"accuracy.html": "toy_model_report.png"}),
    "train_saes": (
        "train_saes",
        "--architectures topk --d-sae 256 --k 8 --train-limit 4000 --limit 200 --sites "
        + ",".join(f"thought.{k}.hook_hidden" for k in range(1, 7)),
        {"sae_quality.html": "train_saes.png"},
    ),
    "step_importance": (
        "step_importance",
        "--interventions zero,mean --scopes single,pairs --limit 200",
        {"pairs_zero.html": "step_importance_pairs.png"},
    ),
    "step_importance_donors": (
        "step_importance",
        "--interventions swap,noise --scopes single --donors 4 --limit 200",
        {},
    ),
    "step_importance_site": (
        "step_importance",
        "--site blocks.0.hook_resid_post --interventions zero,mean --scopes single --limit 200",
        {},
    ),
    "ablation_attention": (
        "ablation_attention",
        "--limit 200",
        {"thought_to_thought.html": "thought_to_thought.png", "question_to_thought.html": "question_to_thought.png"},
    ),
    "route_patching": (
        "route_patching",
        "--limit 200 --kv-heads",
        {"attention_by_layer.html": "route_patching_layers.png"},
    ),
    "logit_attribution": (
        "logit_attribution",
        "--limit 200",
        {"parts.html": "logit_attribution.png", "sources.html": "logit_attribution_sources.png"},
    ),
    "path_patching": ("path_patching", "--limit 200", {"paths.html": "path_patching.png"}),
    "compare_models": ("compare_models", "--limit 200", {"comparison.html": "compare_models.png"}),
    "sae_features": ("sae_features", "--saes {runs}/train_saes --limit 200", {"dashboard_*.html": "sae_features.png"}),
    "feature_pathways_one_target": (
        "feature_pathways",
        "--saes {runs}/train_saes --limit 200 --candidates 20",
        {"pathways.html": "feature_pathways.png"},
    ),
    "feature_pathways": (
        "feature_pathways",
        "--saes {runs}/train_saes --targets causal --screen {parts}/features --limit 200 --candidates 20",
        {"pathways.html": "feature_pathways_targets.png"},
    ),
    "feature_report": (
        "feature_report",
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


def card_block(name: str = "toy-chain") -> str:
    """The headline numbers of a shipped model's card (``card.json`` beside its weights), in a sentence."""
    from codi_lens.loading import PRETRAINED

    card = json.loads((Path(PRETRAINED[name]) / "card.json").read_text())["summary"]
    accuracy, patching = card["accuracy"], card["patching"]
    last = max(r["hook"] for r in patching["recovery"] if r["hook"].endswith("hook_resid_post"))
    recovery = {
        r["donor"]: f"{r['mean']:.2f} [{r['ci95'][0]:.2f}, {r['ci95'][1]:.2f}]"
        for r in patching["recovery"]
        if r["hook"] == last and r["position"] == "latents"
    }
    return (
        f"From `{name}`'s card (`card.json`, {card['n_problems']:,} test problems, generated by `python -m "
        f"docs.regenerate`): {100 * accuracy['latents']:.1f}% with thoughts, "
        f"{100 * accuracy['zero_all_thoughts']:.1f}% with them zeroed, "
        f"{100 * accuracy['teacher_explicit_cot']:.1f}% in teacher mode and "
        f"{100 * accuracy['no_cot_baseline']:.1f}% for its no-CoT twin. Patching BOT and the thoughts at `{last}` "
        f"from the clean run recovers {recovery.get('clean', 'n/a')} of the logit difference on "
        f"{patching['n_pairs_used']} of {patching['n_pairs']} minimal pairs; from another problem's run, "
        f"{recovery.get('other', 'n/a')}.\n"
    )


def rewrite(text: str, blocks: dict[str, str]) -> str:
    """``text`` with the body of every ``findings:<part>`` block replaced by ``blocks[part]`` (others kept)."""

    def replace(match: re.Match) -> str:
        body = blocks.get(match["part"], match["body"])
        return match[1] + body + match[4]

    return BLOCK.sub(replace, text)


def _per_invocation(key: str) -> bool:
    """A number of one invocation of a command (its wall time, its throughput), which a resumed run changes."""
    return key.startswith("wall_") or "this_invocation" in key


def summary_block(summary: dict[str, Any], command: str, reading: Sequence[str] = (), *, limit: int = 120) -> str:
    """A generated block from a command's ``summary.json``: the command, the ``reading`` lines generated from its
    numbers, then the numbers (a value with a CI as ``m [low, high]``), folded; at most ``limit`` rows, and a line
    saying how many were left out."""
    rows = []

    def walk(value: Any, key: str) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{key}/{k}" if key else str(k))
        elif isinstance(value, list) and value and all(isinstance(x, dict) for x in value):
            for item in value:  # a ranked list: each item under the names it carries
                label = " ".join(str(v) for v in item.values() if isinstance(v, str))
                walk({k: v for k, v in item.items() if not isinstance(v, str)}, f"{key}/{label}")
        elif isinstance(value, list) and len(value) == 3 and all(isinstance(x, (int, float)) for x in value):
            rows.append((key, _number(value)))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and not _per_invocation(key):
            rows.append((key, f"{value:.4g}"))

    walk(summary, "")
    lines = [
        f"**On toy-chain**, generated by `python -m docs.regenerate --all` from `python -m experiments.{command}`'s "
        "`summary.json` (float32, CPU):",
        "",
        *(f"- {line}" for line in reading),
        *([""] if reading else []),
        "<details><summary>the run's numbers</summary>",
        "",
        "| number | value |",
        "|---|---|",
        *(f"| {key} | {value} |" for key, value in rows[:limit]),
        "",
        *(
            [f"The first {limit} of {len(rows)} numbers; the rest are in `summary.json`.", ""]
            if len(rows) > limit
            else []
        ),
        "</details>",
        "",
    ]
    return "\n".join(lines)


def _single_reading(summary: dict[str, Any], folder: Path) -> list[str]:
    """Per intervention of a step-importance run (its ``importance.parquet``, single scope): where it breaks the
    most and the fewest right answers, and, with several draws per problem, how far the draws' means spread."""
    import pandas as pd

    table = folder / "importance.parquet"
    if not table.exists():
        return []
    frame = pd.read_parquet(table)
    lines = []
    for intervention, rows in frame[frame["scope"] == "single"].groupby("intervention", sort=True):
        rate = {int(r.thought): [r.importance, r.importance_low, r.importance_high] for r in rows.itertuples()}
        high, low = max(rate, key=lambda k: rate[k][0]), min(rate, key=lambda k: rate[k][0])
        line = (
            f"`{intervention}` breaks the most right answers at thought {high} ({_number(rate[high])}) and the "
            f"fewest at thought {low} ({_number(rate[low])})"
        )
        if rows["n_draws"].max() > 1:
            sd = rows["importance_draw_sd"]
            line += (
                f"; across the {int(rows['n_draws'].max())} draws, the SD of the mean is {sd.min():.3f}-{sd.max():.3f}"
            )
        lines.append(line + ".")
    return lines


def _pairs_reading(summary: dict[str, Any], folder: Path) -> list[str]:
    """Per intervention of a run with ``--scopes pairs``: how many pairs add, back each other up or work together,
    by the CI of their interaction and its BH q."""
    lines = []
    sets = {k: v for k, v in summary.get("set_interactions", {}).items() if isinstance(v, dict)}
    for intervention in sorted({k.split("/")[0] for k in sets}):
        mine = [v for k, v in sets.items() if k.startswith(f"{intervention}/")]
        means = [v["logprob_interaction"][0] for v in mine]
        redundant = sum(v["logprob_interaction"][1] > 0 and v["bh_q"] < 0.05 for v in mine)
        synergy = sum(v["logprob_interaction"][2] < 0 and v["bh_q"] < 0.05 for v in mine)
        together = max(v["breaks_only_together"] for v in mine)
        lines.append(
            f"`{intervention}`: {redundant} of {len(mine)} pairs cost less together than the sum of their parts "
            f"(CI above 0, BH q < 0.05) and {synergy} cost more; the interaction runs from {min(means):+.2f} to "
            f"{max(means):+.2f} nats, and at most {100 * together:.1f}% of right answers break only when the two "
            "go together."
        )
    return lines + _single_reading(summary, folder)


def _routes_reading(summary: dict[str, Any], folder: Path) -> list[str]:
    """Route patching: which route carries each step's content, the share that is the problem's own value (against
    another problem's run) and whether the routes add."""
    steps = summary["steps"]
    both = {k: v for k, v in steps.items() if "recurrence" in v}
    carried = [v["recurrence_minus_attention"].get("carried_by", "neither") for v in both.values()]
    own = {k: v["recurrence_own_minus_other_problem"]["mean"] for k, v in both.items()}
    top = max(both, key=lambda k: both[k]["recurrence"][0])
    most_attention = max(steps, key=lambda k: steps[k]["attention"][0])
    interaction = max(both.values(), key=lambda v: abs(v["interaction"][0]))["interaction"]
    return [
        f"{summary['n_pairs_used']} of {summary['n_pairs']} pairs used. The recurrence carries more than attention "
        f"at {carried.count('recurrence')} of {len(carried)} steps that have both routes, attention at "
        f"{carried.count('attention')} (Wilcoxon, BH q < 0.05). Recurrence alone recovers the most at {top} "
        f"({_number(both[top]['recurrence'])}); attention alone the most at {most_attention} "
        f"({_number(steps[most_attention]['attention'])}).",
        "The recurrence's own-problem share (own minus another problem's run) runs from "
        + ", ".join(f"{k} {_number(v)}" for k, v in own.items())
        + f". The largest interaction of the two routes is {_number(interaction)}.",
    ]


def _comparison_reading(summary: dict[str, Any], folder: Path) -> list[str]:
    """Model comparison: the two comparisons' own readings (where each step's value is stored, what the recurrence
    carries), as the command generated them from its numbers."""
    readings = summary["readings"]
    return [
        line
        for title in ("Where each step's value is stored", "What the recurrence carries")
        for line in readings.get(title, [])
        if line
    ]


def _attribution_reading(summary: dict[str, Any], folder: Path) -> list[str]:
    """Direct logit attribution: the totals, the components that write the most, and the heads with their
    sources."""
    total = summary["total"]
    parts = [f"{p['component']} {_number(p['contribution'])} ({p['run']})" for p in summary["largest_parts"]]
    heads = [
        f"{h['head']} {_number(h['contribution'])} (BH q {h['bh_q']:.2g}; reads most from {h['reads_most_from']}"
        + (f", {h['share_from_there']:.2f} of it" if h.get("share_from_there") is not None else "")
        + ")"
        for h in summary["top_heads"]
        if h["bh_q"] < 0.05
    ]
    return [
        f"The logit difference is {_number(total['clean'])} in the clean run and {_number(total['corrupted'])} in "
        f"the corrupted run, over {summary['n_pairs_used']} of {summary['n_pairs']} pairs. The largest parts: "
        + "; ".join(parts)
        + ".",
        f"{len(heads)} heads write a share with BH q < 0.05: " + "; ".join(heads) + "."
        if heads
        else "No head's share passes BH at 0.05.",
    ]


def _paths_reading(summary: dict[str, Any], folder: Path) -> list[str]:
    """Path patching: the paths that recover the most, and how many pass BH."""
    paths = summary["paths"]
    passing = [k for k, v in paths.items() if v["bh_q"] < 0.05]
    ranked = sorted(paths, key=lambda k: -paths[k]["recovery"][0])[:5]
    return [
        f"{len(passing)} of {len(paths)} paths recover a share with BH q < 0.05 ({summary['n_pairs_used']} of "
        f"{summary['n_pairs']} pairs). The largest: "
        + "; ".join(f"{k} {_number(paths[k]['recovery'])} ({paths[k]['group']})" for k in ranked)
        + "."
    ]


def _share(record: dict[str, Any]) -> str:
    """``48% [28%, 68%] of 25``: a share with its CI and its count."""
    from codi_lens.reports.battery import ci_text

    return f"{ci_text([record['share'], record['low'], record['high']], percent=True)} of {record['n']}"


def _pathways_reading(summary: dict[str, Any], folder: Path) -> list[str]:
    """Feature pathways: how many validate, the agreement of predicted and replayed changes, and the validated
    share by how many thoughts a pathway spans."""
    import pandas as pd

    lines = [
        f"{summary['n_validated']} of {summary['n_pathways']} pathways to {summary['n_targets']} targets validate; "
        f"predicted against replayed change, pooled Pearson {summary['pooled_pearson']:.2f} "
        f"[{summary['pooled_pearson_ci95'][0]:.2f}, {summary['pooled_pearson_ci95'][1]:.2f}] over "
        f"{summary['n_problems']} problems."
    ]
    table = folder / "pathways.parquet"
    if table.exists():
        paths = pd.read_parquet(table)
        thought = paths[["target_id", "source_id"]].apply(lambda c: c.str.extract(r"thought\.(\d+)\.")[0].astype(int))
        counts = paths.assign(span=thought["target_id"] - thought["source_id"]).groupby("span")["validated"]
        lines.append(
            "By the thoughts a pathway spans: "
            + ", ".join(
                f"{span}: {int(n)} of {int(total)}" for span, (n, total) in counts.agg(["sum", "count"]).iterrows()
            )
            + "."
        )
    return lines


def _feature_report_reading(summary: dict[str, Any], folder: Path) -> list[str]:
    """The feature report: causal features, whether they encode their own step's value against the rest and a
    shuffled control, and whether validated pathways run one thought at a time (Fisher's exact test)."""
    from scipy.stats import fisher_exact

    own, best, ways = summary["encodes_own_step"], summary["best_step_is_own"], summary["pathways"]
    adjacent_tested, adjacent_ok = ways["adjacent_tested"], ways["adjacent_validated"]
    skipping_tested, skipping_ok = ways["tested"] - adjacent_tested, ways["validated"] - adjacent_ok
    table = [[adjacent_ok, adjacent_tested - adjacent_ok], [skipping_ok, skipping_tested - skipping_ok]]
    p_value = fisher_exact(table)[1] if skipping_tested and adjacent_tested else float("nan")
    return [
        f"{summary['n_causal']} of {summary['n_screened']} screened features are causal; {summary['orphan_ids']} "
        "orphan ids.",
        f"Encode their own step's value (Spearman, BH q < 0.05): causal {_share(own['causal'])}, the rest "
        f"{_share(own['not_causal'])}. Correlate most with their own thought's step: causal {_share(best['causal'])}, "
        f"the rest {_share(best['not_causal'])}, activations moved to other problems {_share(best['shuffled'])}.",
        f"{ways['validated']} of {ways['tested']} traced pathways validate: {ways['adjacent_validated']} of "
        f"{adjacent_tested} from thought j to j+1, {skipping_ok} of {skipping_tested} that skip a thought "
        f"(Fisher p = {p_value:.2g}).",
    ]


#: Readings generated from a run's ``summary.json`` (and its folder), put above its numbers.
READERS = {
    "step_importance": _pairs_reading,
    "step_importance_donors": _single_reading,
    "step_importance_site": _single_reading,
    "route_patching": _routes_reading,
    "compare_models": _comparison_reading,
    "logit_attribution": _attribution_reading,
    "path_patching": _paths_reading,
    "feature_pathways": _pathways_reading,
    "feature_report": _feature_report_reading,
}


def run_commands(out: Path, saes: str | None) -> dict[str, str]:
    """Every run of :data:`RUNS` (resumable), each page's generated block by its name."""
    import importlib

    from codi_lens.run.store import SettingsMismatchError

    runs, parts = out / "runs", out / "parts"
    blocks = {}
    for name, (command, flags, _) in RUNS.items():
        shown = f"{command} {flags.format(runs='OUT/runs', parts='OUT/parts')}"  # OUT: the report's folder
        if not (name == "train_saes" and saes):  # given: the SAEs the report screened (main trains them first)
            text = flags.format(runs=runs, parts=parts).replace(f"{runs}/train_saes", saes or f"{runs}/train_saes")
            argv = [*text.split(), "--out", str(runs / name)]
            print(f"docs: python -m experiments.{command} {' '.join(argv)}", file=sys.stderr)
            main = importlib.import_module(f"experiments.{command}").main
            try:
                main(argv)
            except SettingsMismatchError as exc:  # RUNS changed since that folder was written: start it afresh
                print(f"docs: {exc}; rerunning with --overwrite", file=sys.stderr)
                main([*argv, "--overwrite"])
        summary = runs / name / "summary.json"
        if summary.exists():
            record = json.loads(summary.read_text())
            reading = READERS[name](record, runs / name) if name in READERS else []
            blocks[f"run_{name}"] = summary_block(record, shown, reading)
    return blocks


def figures(out: Path) -> list[str]:
    """Screenshots of the report's parts' figures and the commands' figures into ``docs/img/``."""
    done = []
    pairs = [(out / "parts" / html, image) for html, image in PART_FIGURES.items()]
    for name, (_, _, shots) in RUNS.items():
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
        _, flags, _ = RUNS["train_saes"]
        train_saes.main([*flags.split(), "--out", str(out / "runs" / "train_saes")])
        saes = str(out / "runs" / "train_saes")
    flags = ["--limit", str(args.limit), "--problems", str(args.problems), "--out", args.out]
    record = report.main(flags + (["--saes", saes] if saes else []))
    blocks = {part: findings_block(record, part) for part in PAGES}
    blocks["report"] = report_block(record)
    blocks["card"] = card_block()
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
