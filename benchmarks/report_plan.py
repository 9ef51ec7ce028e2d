"""The report's budget planner against the clock: each part's estimated minutes (from its pilots) beside the
minutes it took, measured in one run of ``experiments.report --budget``.

    python -m benchmarks.report_plan [--budget 15m] [--checkpoint toy-chain] [--parts ...] [--saes DIR]
    python -m benchmarks.report_plan --quick

Prints a row per part that ran (estimated and actual minutes, their ratio) and, last, ``planner max_ratio <R>
within_budget <True|False> ...``: R is the largest of actual / estimated and estimated / actual over the parts
(the goal: at most 2); the pilots and the parts together (the model load aside) must end within the budget.
``--quick`` (one cheap part, a 20-second budget) is what the test suite runs: it checks that every part has an
estimate and an actual time, not how close they are.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import pandas as pd

from experiments import report


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", default="15m")
    parser.add_argument("--checkpoint", default="toy-chain")
    parser.add_argument("--parts", default=None)
    parser.add_argument("--saes", default=None)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    flags = ["--checkpoint", args.checkpoint, "--budget", "20s" if args.quick else args.budget]
    parts = "accuracy" if args.quick else args.parts
    flags += ["--parts", parts] if parts else []
    flags += ["--saes", args.saes] if args.saes else []
    flags += ["--problems", "48", "--max-new-tokens", "16"] if args.quick else []
    with tempfile.TemporaryDirectory() as out:
        started = time.perf_counter()
        record = report.main([*flags, "--out", out])
        wall = time.perf_counter() - started
    plan = pd.DataFrame(record["plan"])
    ran = plan[plan["skipped"] == ""].copy()
    ran["ratio"] = ran["actual_min"] / ran["estimated_min"]
    print(ran[["part", "unit", "units", "estimated_min", "actual_min", "ratio"]].to_string(index=False))
    worst = float(pd.concat([ran["ratio"], 1 / ran["ratio"]]).max())
    seconds = record["seconds"]
    spent = seconds["pilots"] + seconds["parts"]
    line = (
        f"planner max_ratio {worst:.2f} within_budget {spent <= seconds['budget']} report_min {spent / 60:.1f} "
        f"budget_min {seconds['budget'] / 60:.1f} wall_min {wall / 60:.1f}"
    )
    print(line)
    return line


if __name__ == "__main__":
    main()
