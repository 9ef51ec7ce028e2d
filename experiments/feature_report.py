"""Everything known about each SAE feature of the thoughts, in one table and one page.

    python -m experiments.feature_report [--screen results/feature_screen] [--pathways results/feature_pathways]
        [--features results/sae_features] [--saes results/train_saes] [--top 20] [--out DIR]

Joins, on the feature id (``site/feature``), the outputs of ``experiments.feature_screen`` (required: the
effect of ablating and clamping each feature, the causal selection), ``experiments.feature_pathways --targets
causal`` (validated upstream and downstream pathways), and ``experiments.sae_features --intervene-features
causal`` (the answer tokens an intervention moves, top-activating problems and their intermediate values),
each when its folder holds results. Before joining, every table's feature ids are checked against the SAEs in
``--saes`` (orphans are listed in the page and ``audit.parquet``). From the screen's own per-problem activations
and the problems it ran on (read from its ``run.json``), each feature's Spearman correlation with every step's
intermediate value: does a feature of thought k encode the value after step k? The control moves every
feature's activations to other problems (one seeded permutation). No model is loaded.

Writes to ``--out`` (default ``results/feature_report``): ``results.parquet`` (one row per screened
feature), ``encoding.parquet``, ``audit.parquet``, ``summary.json`` and ``report.html`` (offline).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

from codi_lens.core.errors import FlagError
from codi_lens.data import load_problems
from codi_lens.feature_report import feature_table, own_step_shares, shuffled_problems, value_encoding
from codi_lens.feature_screen import Screen
from codi_lens.reports.features import feature_report_lines, write_feature_report
from codi_lens.run.cli import run_main
from codi_lens.saes import load_saes
from codi_lens.saes.ids import audit_feature_ids, saes_by_site


def read_if_there(path: Path) -> pd.DataFrame | None:
    return pd.read_parquet(path) if path.exists() else None


def screen_problems(screen: Path) -> list:
    """The problems the screen ran on, from its ``run.json``."""
    settings = json.loads((screen / "run.json").read_text())["settings"]
    problems = load_problems(settings["data_source"], limit=settings.get("limit"))
    chosen = settings.get("selected_problem_ids")
    return [p for p in problems if p.id in set(chosen)] if chosen else problems


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--screen", default="results/feature_screen", help="experiments.feature_screen --out")
    parser.add_argument("--pathways", default="results/feature_pathways", help="feature_pathways --targets --out")
    parser.add_argument("--features", default="results/sae_features", help="experiments.sae_features --out")
    parser.add_argument("--saes", default="results/train_saes", help="the SAEs the ids must name")
    parser.add_argument("--sae-ids", default=None, help="comma-separated SAE ids (one per site)")
    parser.add_argument("--top", type=int, default=20, help="causal features in the page's table")
    parser.add_argument("--out", default="results/feature_report", help="output folder")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = parser.parse_args(argv)
    screen_dir = Path(args.screen)
    for name in ("summary.parquet", "causal.parquet", "features.parquet", "results.parquet", "run.json"):
        if not (screen_dir / name).exists():
            raise FlagError(f"--screen {screen_dir}: {name} is missing (run python -m experiments.feature_screen)")
    ids = [i.strip() for i in args.sae_ids.split(",")] if args.sae_ids else None
    saes = saes_by_site(load_saes(args.saes, ids))
    rows = pd.read_parquet(screen_dir / "results.parquet", columns=["feature_id", "op", "problem_id", "activation"])
    screen = Screen(
        rows=rows,
        summary=pd.read_parquet(screen_dir / "summary.parquet"),
        causal=pd.read_parquet(screen_dir / "causal.parquet"),
        features=pd.read_parquet(screen_dir / "features.parquet"),
    )
    pathways = read_if_there(Path(args.pathways) / "pathways.parquet")
    tokens = read_if_there(Path(args.features) / "token_association" / "results.parquet")
    examples = read_if_there(Path(args.features) / "top_examples.parquet")
    first_op = rows["op"].iloc[0] if len(rows) else None
    activations = rows[rows["op"] == first_op].drop(columns="op")  # the activation is the same under every edit
    problems = screen_problems(screen_dir)
    encoding = value_encoding(activations, problems)
    shuffled = value_encoding(shuffled_problems(activations), problems)
    own_steps = own_step_shares(encoding, shuffled, screen.causal["feature_id"])
    tables = {"screen": screen.summary, "causal": screen.causal, "encoding": encoding}
    if pathways is not None:
        tables |= {
            "pathways (targets)": pathways.rename(columns={"target_id": "feature_id"}),
            "pathways (sources)": pathways.rename(columns={"source_id": "feature_id"}),
        }
    if tokens is not None:
        tables["token_association"] = tokens
    if examples is not None:
        tables["top_examples"] = examples
    orphans = audit_feature_ids(tables, saes)
    table = feature_table(
        screen.summary, screen.causal, encoding=encoding, pathways=pathways, tokens=tokens, examples=examples
    )
    out = Path(args.out)
    summary = write_feature_report(table, screen, pathways, orphans, out, own_steps=own_steps, top=args.top)
    encoding.to_parquet(out / "encoding.parquet", index=False)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
    for line in feature_report_lines(summary):
        print(line)
    return summary


if __name__ == "__main__":
    run_main(main)
