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
import time

import pandas as pd

from codi_lens.accuracy import Condition, evaluate_conditions
from codi_lens.data import load_problems
from codi_lens.run.cli import (
    add_common_args,
    executor_from_args,
    load_model,
    model_settings,
    parse_common_args,
    run_main,
)


def main(argv: list[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, out="results/evaluate", batch_size=8)
    parser.add_argument("--n-latents", type=int, default=6, help="continuous thoughts fed back (CODI: 6)")
    args = parse_common_args(parser, argv)

    started = time.perf_counter()
    model = load_model(args)
    problems = load_problems(args.data, split=args.split, limit=args.limit)
    condition = Condition("latents", model, n_latents=args.n_latents, max_new_tokens=args.max_new_tokens)
    settings = {**model_settings(model, args), "data_source": args.data, "limit": args.limit}
    table, store = evaluate_conditions(
        [condition],
        problems,
        args.out,
        batch_size=args.batch_size,
        settings=settings,
        overwrite=args.overwrite,
        executor=executor_from_args(args),
    )
    n_correct = int(table["correct"].sum())
    store.finish(
        table,
        {
            "n_problems": len(table),
            "n_correct": n_correct,
            "accuracy": n_correct / max(1, len(table)),
            "wall_seconds_this_invocation": round(time.perf_counter() - started, 1),
        },
    )
    print(f"accuracy: {n_correct}/{len(table)}")
    return table


if __name__ == "__main__":
    run_main(main)
