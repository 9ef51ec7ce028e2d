"""Accuracy of a CODI checkpoint on GSM8K-format problems, resumable and refusing stale results.

    python -m experiments.evaluate [--checkpoint toy-chain] [--data toy-chain:test] [--limit N] [--out DIR]

Writes to ``--out`` (default ``results/evaluate``): ``run.json`` (checkpoint content hash, data
fingerprint, budget, ...), ``parts/`` (predictions as each batch finishes), ``results.parquet``
(one row per problem) and ``summary.json``. Rerunning the same command after a kill continues where
it stopped; rerunning with another checkpoint, data or budget into the same folder is refused (use
``--overwrite`` or another ``--out``). The last line printed is ``accuracy: X/N``.
"""

from __future__ import annotations

import argparse

import pandas as pd

from codi_lens.accuracy import Condition, evaluate_conditions
from codi_lens.run.cli import add_common_args, parse_common_args, run_main, start_run


def main(argv: list[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, out="results/evaluate", batch_size=8)
    parser.add_argument("--n-latents", type=int, default=6, help="continuous thoughts fed back (CODI: 6)")
    args = parse_common_args(parser, argv)

    run = start_run(args)
    problems = run.problems()
    condition = Condition("latents", run.model, n_latents=args.n_latents, max_new_tokens=args.max_new_tokens)
    table, store = evaluate_conditions(
        [condition],
        problems,
        args.out,
        batch_size=args.batch_size,
        settings=run.settings(),
        overwrite=args.overwrite,
        executor=run.executor,
    )
    n_correct = int(table["correct"].sum())
    store.finish(
        table,
        {
            "n_problems": len(table),
            "n_correct": n_correct,
            "accuracy": n_correct / max(1, len(table)),
            "wall_seconds_this_invocation": run.elapsed(),
        },
    )
    print(f"accuracy: {n_correct}/{len(table)}")
    return table


if __name__ == "__main__":
    run_main(main)
