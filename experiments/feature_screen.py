"""Which SAE features of the thoughts change the answer? Every feature ablated and clamped inside the loop.

    python -m experiments.feature_screen [--saes results/train_saes] [--sae-ids ID,...] [--data toy-chain:test]
        [--limit 200] [--ops ablate,clamp] [--quantile 0.99] [--top-frequent N] [--top-per-site 50]
        [--alpha 0.05] [--out DIR]

For each SAE (one per site; ``--sae-ids`` picks one where a folder holds two), spliced into the loop with its
error term, every feature active on at least one problem (or the ``--top-frequent`` most frequent of them) is
ablated (set to 0) and clamped (set to the ``--quantile`` of its activations where active) at the SAE's site.
Each clamp comes with a control: the same push at the site along a random direction. Per problem: the change
in the log-probability of the gold answer number (every token, teacher-forced after the model's own answer
prefix), KL at the answer, and the change in correctness of the greedy answer.

Tested per (feature, edit): an ablation over the problems where the feature is active, a clamp over every
problem net of its control; mean effect with a 95% bootstrap CI over problems, Cohen's d_z, a t-test p-value
(none for an edit tested on fewer than ``--min-problems``, 10), and Benjamini-Hochberg across every (feature,
edit). Causal features: a passing edit with a mean effect of at least ``--min-effect`` nats (0.05); per site
the ``--top-per-site`` strongest by |d|. Edits run as branches from the run cut at the SAE's thought, many per
forward; ``benchmarks.feature_screen`` times it against one run per feature.

Writes to ``--out`` (default ``results/feature_screen``): ``run.json``, ``parts/``, ``results.parquet`` (one
row per feature x edit x problem: ``feature_id, site, feature, op, value, problem_id, active, activation,
gold_logprob_change, kl, correct_change``), ``summary.parquet`` (one row per feature x edit), ``causal.parquet``
(the selected features, ``feature_id`` = ``site/feature``), ``features.parquet`` (every feature's frequency,
live, screened), ``counts.parquet``, ``summary.json``, ``screen.html`` and ``screen_counts.html``. Resumable.
"""

from __future__ import annotations

from pathlib import Path

from codi_lens.core.errors import FlagError
from codi_lens.feature_screen import MIN_EFFECT, MIN_PROBLEMS, SCREEN_OPS, screen_features
from codi_lens.reports.saes import screen_lines, write_screen
from codi_lens.run.cli import command_parser, parse_common_args, run_main, start_run
from codi_lens.saes import load_saes
from codi_lens.saes.ids import saes_by_site


def parse_ops(text: str) -> list[str]:
    ops = [op.strip() for op in text.split(",") if op.strip()]
    unknown = [op for op in ops if op not in SCREEN_OPS]
    if unknown or not ops:
        raise FlagError(f"--ops: {unknown[0] if unknown else 'nothing'!r} is not an edit; give some of {SCREEN_OPS}")
    return ops


def main(argv: list[str] | None = None) -> dict:
    parser = command_parser(__doc__, out="results/feature_screen", limit=200, max_new_tokens=64)
    parser.add_argument("--saes", default="results/train_saes", help="folder of SAELens folders (train_saes --out)")
    parser.add_argument("--sae-ids", default=None, help="comma-separated SAE ids (default: all; one per site)")
    parser.add_argument("--ops", default="ablate,clamp", help="edits to screen (each clamp brings its control)")
    parser.add_argument("--quantile", type=float, default=0.99, help="clamp to this quantile of active values")
    parser.add_argument("--top-frequent", type=int, default=None, help="screen only the N most frequent per SAE")
    parser.add_argument("--top-per-site", type=int, default=50, help="causal features kept per site, by |d|")
    parser.add_argument("--alpha", type=float, default=0.05, help="false discovery rate (Benjamini-Hochberg)")
    parser.add_argument("--min-problems", type=int, default=MIN_PROBLEMS, help="fewest problems an edit is tested on")
    parser.add_argument("--min-effect", type=float, default=MIN_EFFECT, help="least |mean effect| (nats) to select")
    parser.add_argument("--block-size", type=int, default=50, help="problems per resumable unit")
    parser.add_argument("--max-rows", type=int, default=256, help="at most this many rows (edits x problems)")
    parser.add_argument("--n-latents", type=int, default=6, help="continuous thoughts fed back (CODI: 6)")
    args = parse_common_args(parser, argv)
    ops = parse_ops(args.ops)
    if not 0 < args.quantile <= 1:
        raise FlagError(f"--quantile {args.quantile}: give a quantile in (0, 1]")
    ids = [i.strip() for i in args.sae_ids.split(",")] if args.sae_ids else None
    run = start_run(args)
    problems = run.problems()
    saes = saes_by_site(load_saes(args.saes, ids, device=args.device))  # checked before the model loads
    settings = run.settings(
        saes=str(Path(args.saes)),
        sites=list(saes),
        ops=ops,
        quantile=args.quantile,
        top_frequent=args.top_frequent,
        block_size=args.block_size,
        n_latents=args.n_latents,
        max_new_tokens=args.max_new_tokens,
    )
    screen, store = screen_features(
        run.model,
        saes,
        problems,
        run.out,
        ops=ops,
        quantile=args.quantile,
        top_frequent=args.top_frequent,
        top_per_site=args.top_per_site,
        alpha=args.alpha,
        min_problems=args.min_problems,
        min_effect=args.min_effect,
        n_latents=args.n_latents,
        max_new_tokens=args.max_new_tokens,
        block_size=args.block_size,
        max_rows=args.max_rows,
        settings=settings,
        overwrite=args.overwrite,
    )
    summary = {"n_problems": len(problems), **write_screen(screen, run.out)}
    summary["wall_seconds_this_invocation"] = run.elapsed()
    store.finish(screen.rows, summary)
    for line in screen_lines(summary):
        print(line)
    return summary


if __name__ == "__main__":
    run_main(main)
