"""Mutation scores per module from mutmut, on every mutant or on a seeded random sample of each module.

A full ``mutmut run`` of the configured modules ([tool.mutmut] in pyproject.toml) takes hours on a 2-core
machine; a random sample of mutants per module estimates each score with a Wilson interval in minutes.

    CODI_LENS_TEST_THREADS=1 python -m mutmut run "codi_lens.core.names.*"     # any run generates all mutants
    CODI_LENS_TEST_THREADS=1 python scripts/mutation_sample.py run --per-module 60 --seed 0
    python scripts/mutation_sample.py report                # every mutant that has a result
    python scripts/mutation_sample.py report --survivors    # and the names of those that survived

``run`` needs the ``mutants/`` folder a previous ``mutmut run`` generated; mutants that already have a
result are not run again. The score counts a timeout as a kill and a mutant no test reaches as a survivor.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

from mutmut.stats import status_by_exit_code
from statsmodels.stats.proportion import proportion_confint

CAUGHT = ("killed", "timeout")
NOT_RUN = ("not checked", "skipped")


def results(mutants: Path) -> dict[str, dict[str, str]]:
    """{module file: {mutant name: status}} read from mutmut's ``.meta`` files under ``mutants/``."""
    metas = sorted(mutants.rglob("*.py.meta"))
    if not metas:
        sys.exit(f"no mutmut results under {mutants}/: run `python -m mutmut run` once to generate the mutants")
    table = {}
    for meta in metas:
        codes = json.loads(meta.read_text())["exit_code_by_key"]
        module = str(meta.relative_to(mutants)).removesuffix(".meta")
        table[module] = {name: status_by_exit_code[code] for name, code in codes.items()}
    return table


def sample(table: dict[str, dict[str, str]], per_module: int, seed: int) -> list[str]:
    """The same ``per_module`` mutant names of each module for a given seed (all of a smaller module)."""
    rng = random.Random(seed)
    chosen = []
    for module in sorted(table):
        names = sorted(table[module])
        chosen += rng.sample(names, min(per_module, len(names)))
    return chosen


def report(table: dict[str, dict[str, str]], survivors: bool) -> None:
    header = f"{'module':32} {'run':>5} {'of':>5} {'killed':>6} {'timeout':>7} {'survived':>8} {'no tests':>8}"
    print(header + "  score [95% Wilson]")
    for module in sorted(table):
        counts = Counter(table[module].values())
        caught = sum(counts[status] for status in CAUGHT)
        run = sum(n for status, n in counts.items() if status not in NOT_RUN)
        if run == 0:
            print(f"{module:32} {0:5} {len(table[module]):5}  (nothing run yet)")
            continue
        low, high = proportion_confint(caught, run, alpha=0.05, method="wilson")
        print(
            f"{module:32} {run:5} {len(table[module]):5} {counts['killed']:6} {counts['timeout']:7} "
            f"{counts['survived']:8} {counts['no tests']:8}  {caught / run:.2f} [{low:.2f}, {high:.2f}]"
        )
        if survivors:
            for name, status in sorted(table[module].items()):
                if status not in CAUGHT + NOT_RUN:
                    print(f"    {status:9} {name}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["run", "report"])
    parser.add_argument("--per-module", type=int, default=60, help="mutants drawn from each module (run)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the draw (run)")
    parser.add_argument("--max-children", type=int, default=2, help="mutmut worker processes (run)")
    parser.add_argument("--survivors", action="store_true", help="list the mutants no test killed (report)")
    parser.add_argument("--mutants", type=Path, default=Path("mutants"), help="mutmut's working folder")
    args = parser.parse_args(argv)
    table = results(args.mutants)
    if args.command == "run":
        status = {name: code for statuses in table.values() for name, code in statuses.items()}
        pending = [name for name in sample(table, args.per_module, args.seed) if status[name] == "not checked"]
        print(f"running {len(pending)} sampled mutants not yet run", flush=True)
        if pending:
            command = [sys.executable, "-m", "mutmut", "run", "--max-children", str(args.max_children), *pending]
            subprocess.run(command, check=True)
        table = results(args.mutants)
    report(table, args.survivors)


if __name__ == "__main__":
    main()
