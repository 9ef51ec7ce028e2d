"""Two latent loops on the same problems, side by side: do they store the running value in the same thoughts, and
how much of it does the recurrence carry?

    python -m experiments.compare_models [--checkpoints toy-chain,toy-coconut] [--bases DIR,DIR] [--limit 100]
        [--parts step_importance,patching,reading,routes] [--data toy-chain:test] [--out results/compare_models]

Every checkpoint (a shipped name or a CODI or Coconut file; ``--bases`` gives each one's base in the same order,
``-`` for a shipped model) runs the same report parts (``--parts``, see ``experiments.report``) on the same first
``--limit`` problems and pairs of ``--data`` (default: the first checkpoint's own test split), each into
``OUT/<checkpoint>/<part>/`` and resumable there. The page shows every section once with each model's values and
95% CIs in its own colour, each model's reading, and two comparisons: the thought where each step's value is stored
(value-matched patching) and the recovery the recurrence carries beyond attention per step, each model against the
first (bootstrap CI over pairs, permutation p-value, Benjamini-Hochberg across steps).

Writes ``comparison.html``, ``summary.json`` (readings, storage, recurrence), ``results.parquet`` (every
section's rows with ``model`` and ``section``) and each model's part folders.
"""

from __future__ import annotations

import argparse

from codi_lens.core.errors import FlagError
from codi_lens.data.pairs import make_pairs
from codi_lens.data.synthetic import value_limit
from codi_lens.reports.battery import PARTS
from codi_lens.reports.comparison import COMPARED_PARTS, ComparedModel, compare_models
from codi_lens.run.cli import command_parser, model_settings, parse_common_args, run_main, start_run


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = command_parser(__doc__, out="results/compare_models", batch_size=16, limit=100, max_new_tokens=96)
    parser.add_argument("--checkpoints", default="toy-chain,toy-coconut", help="comma-separated checkpoints (>= 2)")
    parser.add_argument("--bases", default=None, help="comma-separated bases, one per checkpoint ('-': none needed)")
    parser.add_argument("--parts", default=",".join(COMPARED_PARTS), help=f"comma-separated: {PARTS.help()}")
    parser.add_argument("--seed", type=int, default=0, help="seed of swaps, splits and controls")
    known, _ = parser.parse_known_args(argv)
    checkpoints = [c.strip() for c in known.checkpoints.split(",") if c.strip()]
    if len(checkpoints) < 2:
        raise FlagError(f"--checkpoints {known.checkpoints!r}: name at least two checkpoints")
    parser.set_defaults(checkpoint=checkpoints[0])  # --data defaults to the first checkpoint's own split
    args = parse_common_args(parser, argv)
    bases = [None if b.strip() in ("", "-") else b.strip() for b in (args.bases or "").split(",")] if args.bases else []
    if bases and len(bases) != len(checkpoints):
        raise FlagError(f"--bases gives {len(bases)} bases for {len(checkpoints)} checkpoints")
    args.models = list(zip(checkpoints, bases or [None] * len(checkpoints)))
    PARTS.parse_list(args.parts, "--parts")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    runs = [start_run(argparse.Namespace(**{**vars(args), "checkpoint": c, "base": b})) for c, b in args.models]
    problems = runs[0].problems()
    pairs, _ = make_pairs(problems, max_value=value_limit(problems))
    compared = [
        ComparedModel(run.args.checkpoint, run.model, {**model_settings(run.model, run.args), "data": args.data})
        for run in runs
    ]
    record = compare_models(
        compared,
        problems,
        pairs,
        args.out,
        executor=runs[0].executor,
        limit=args.limit,
        parts=PARTS.parse_list(args.parts, "--parts"),
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
    )
    for title, lines in record["readings"].items():
        print(f"{title}: {' '.join(lines)}")
    print(f"comparison: {args.out}/comparison.html ({runs[0].elapsed() / 60:.1f} min)")
    return record


if __name__ == "__main__":
    run_main(main)
