"""Where does the changed number's information travel? Activation patching inside the latent loop.

    python -m experiments.position_patching [--checkpoint toy-chain] [--data toy-chain:test] [--limit 100]
        [--pairs FILE] [--hooks resid_post,thought_input] [--generate] [--method exact|attribution]
        [--compare] [--out DIR]

For each clean/corrupted pair (made from ``--data`` with ``codi_lens.pairs``, or read from a
``pairs.parquet`` written by ``experiments.make_pairs``), the clean run's activation at each (hook,
position) cell is written into the corrupted run, whose loop then goes on from the patched state.
Positions: the changed number's tokens, the last question token, BOT, thoughts 1..n, EOT, every
thought at once and BOT with every thought at once (``thoughts`` and ``latents``: layer-only);
``thought_input`` patches the fed thought itself (position-only).
Metrics at the answer number, teacher-forced on the clean answer's prefix: logit difference,
normalised recovery, KL(clean || patched); with ``--generate`` also the generated answer's class.
Only pairs whose clean question the model answers right, whose two answers start with different
tokens, and whose corrupted run prefers its own answer's first token to the clean one, enter the
metrics; the others are counted by reason.

``--method attribution`` estimates every cell from one corrupted forward and one backward pass per
batch (attribution patching through the unrolled loop, ``codi_lens.patching.cell_attributions``;
``kl`` is then NaN); ``--compare`` also runs the other method into ``OUT/<method>`` and reports in
``summary.json`` how well attribution ranks the cells against exact patching (Spearman, top-10
overlap).

Writes to ``--out`` (default ``results/position_patching``): ``pairs.parquet`` (the pairs used),
``run.json``, ``parts/``, ``results.parquet`` (``pair_id, hook, layer, thought, position, recovery,
logit_diff, kl``, ...), ``cells.parquet`` (mean and 95% CI per cell), ``summary.json`` and the figures
``heatmap.html`` (layer x position per hook kind, hover: n, mean, CI), ``layer_only.html`` and
``position_only.html``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd

from codi_lens.cli import (
    add_common_args,
    executor_from_args,
    load_model,
    model_settings,
    parse_choices,
    parse_common_args,
    run_main,
)
from codi_lens.data import load_problems
from codi_lens.metrics import mean_ci_table
from codi_lens.pairs import make_pairs
from codi_lens.patching import HOOK_KINDS, METHODS, SPAN_STARTS, patch_sweep, rank_agreement, sweep_cells
from codi_lens.plotting import patching_bars, patching_heatmap, write_html
from codi_lens.synthetic import value_limit


def load_pairs(args: argparse.Namespace) -> pd.DataFrame:
    """Pairs from ``--pairs`` (a pairs.parquet) or made from ``--data``."""
    if args.pairs:
        path = Path(args.pairs)
        if not path.is_file():
            raise FileNotFoundError(f"no pairs file at {str(path)!r}")
        pairs = pd.read_parquet(path)
        missing = {"pair_id", "clean_question", "corrupted_question", "clean_answer", "corrupted_answer"} - set(pairs)
        if missing:
            raise KeyError(f"{path} lacks the column {sorted(missing)[0]!r}")
        return pairs
    problems = load_problems(args.data, split=args.split, limit=args.limit)
    pairs, _ = make_pairs(problems, max_value=value_limit(problems))
    return pairs


def add_pair_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--pairs", default=None, help="a pairs.parquet from experiments.make_pairs (else made from --data)"
    )
    parser.add_argument("--n-latents", type=int, default=6, help="continuous thoughts fed back (CODI: 6)")
    parser.set_defaults(limit=100, batch_size=16)


def skipped_counts(rows: pd.DataFrame) -> dict:
    skipped = rows[rows["reason"].fillna("") != ""].drop_duplicates("pair_id")
    return skipped["reason"].value_counts().to_dict()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, out="results/position_patching")
    add_pair_args(parser)
    parser.add_argument(
        "--hooks", default="resid_post,thought_input", help=f"comma-separated, of {', '.join(HOOK_KINDS)}"
    )
    parser.add_argument("--generate", action="store_true", help="also generate each patched answer (slower)")
    parser.add_argument(
        "--max-rows", type=int, default=256, help="at most this many rows (cells x pairs) in one forward"
    )
    parser.add_argument(
        "--method",
        choices=METHODS,
        default="exact",
        help="exact: patch every cell; attribution: one forward and one backward pass per batch estimate them all",
    )
    parser.add_argument(
        "--compare",
        action="store_true",
        help="also run the other method (into OUT/<method>) and report how the two rank the cells",
    )
    args = parse_common_args(parser, argv)
    if args.generate and args.method == "attribution":
        raise ValueError("--generate needs --method exact: attribution estimates metrics, it generates nothing")
    kinds = parse_choices("--hooks", args.hooks, HOOK_KINDS)

    started = time.perf_counter()
    model = load_model(args)
    pairs = load_pairs(args)
    out = Path(args.out)
    cells = sweep_cells(model.cfg.n_layers, args.n_latents, kinds=kinds, n_heads=model.cfg.n_heads, layer_only=True)
    settings = {**model_settings(model, args), "data_source": args.data, "limit": args.limit, "pairs_file": args.pairs}
    sweep = dict(
        cells=cells,
        n_latents=args.n_latents,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        max_rows=args.max_rows,
        settings=settings,
        overwrite=args.overwrite,
        executor=executor_from_args(args),
    )
    rows, store = patch_sweep(model, pairs, out, generate=args.generate, method=args.method, **sweep)
    agreement = None
    if args.compare:
        other = "attribution" if args.method == "exact" else "exact"
        other_rows, other_store = patch_sweep(model, pairs, out / other, method=other, **sweep)
        other_store.finish(other_rows, {"method": other})
        exact, estimate = (rows, other_rows) if args.method == "exact" else (other_rows, rows)
        agreement = rank_agreement(exact, estimate)
    pairs.to_parquet(out / "pairs.parquet", index=False)
    used = rows[rows["reason"].fillna("") == ""]
    by = ["kind", "hook", "head", "position", "layer"]
    recovery = mean_ci_table(used, by, "recovery").rename(
        columns={"mean": "recovery", "low": "recovery_low", "high": "recovery_high"}
    )
    kl = mean_ci_table(used, by, "kl").rename(columns={"mean": "kl", "low": "kl_low", "high": "kl_high"})
    cells_table = recovery.merge(kl.drop(columns="n"), on=by)
    cells_table.to_parquet(out / "cells.parquet", index=False)

    positions = [
        "changed",
        "question:-1",
        "bot",
        *[f"thought:{k}" for k in range(1, args.n_latents + 1)],
        "eot",
        *SPAN_STARTS,
    ]
    mapped = [kind for kind in kinds if kind not in ("thought_input", "z")]  # per-position kinds
    for kind in mapped:
        write_html(
            patching_heatmap(
                used[used["kind"] == kind],
                positions,
                title=f"{kind}: mean recovery of the clean answer (hover: n pairs, 95% CI)",
            ),
            out / ("heatmap.html" if kind == mapped[0] else f"heatmap_{kind}.html"),
        )
    layer_only = used[used["position"].isin(list(SPAN_STARTS))]
    if len(layer_only):
        label = layer_only["layer"].astype(int).astype(str) + " " + layer_only["kind"] + " " + layer_only["position"]
        write_html(
            patching_bars(
                layer_only.assign(layer=label),
                "layer",
                title="Layer-only: every thought ('thoughts') or BOT and every thought ('latents') "
                "of one layer patched at once (95% CI)",
            ),
            out / "layer_only.html",
        )
    position_only = used[used["kind"] == "thought_input"]
    if len(position_only):
        write_html(
            patching_bars(position_only, "position", title="Position-only: the fed thought patched (95% CI)"),
            out / "position_only.html",
        )

    best = cells_table.sort_values("recovery", ascending=False).head(5)
    summary = {
        "n_pairs": int(rows["pair_id"].nunique()),
        "n_pairs_used": int(used["pair_id"].nunique()),
        "skipped_by_reason": skipped_counts(rows),
        "top_cells": [
            {
                "hook": r.hook,
                "head": None if pd.isna(r.head) else int(r.head),
                "position": r.position,
                "n": int(r.n),
                "recovery": [round(r.recovery, 4), round(r.recovery_low, 4), round(r.recovery_high, 4)],
            }
            for r in best.itertuples()
        ],
        "method": args.method,
        "attribution_vs_exact": agreement,
        "wall_seconds_this_invocation": round(time.perf_counter() - started, 1),
    }
    store.finish(rows, summary)
    print(f"{summary['n_pairs_used']} of {summary['n_pairs']} pairs used; top cells:")
    for cell in summary["top_cells"]:
        print(
            f"  {cell['hook']} {cell['position']}: recovery {cell['recovery'][0]:.3f} "
            f"[{cell['recovery'][1]:.3f}, {cell['recovery'][2]:.3f}]"
        )
    if agreement:
        print(
            f"attribution against exact over {agreement['cells']} cells: Spearman {agreement['spearman']:.2f}, "
            f"top-{agreement['k']} overlap {agreement['top_k_overlap']:.2f}"
        )
    return summary


if __name__ == "__main__":
    run_main(main)
