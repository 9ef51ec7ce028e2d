"""Record the outputs of fixed experiment runs, and compare a later checkout's outputs with them.

    python scripts/behaviour_snapshot.py record DIR      # run every command below into DIR
    python scripts/behaviour_snapshot.py compare DIR NEW # run them again into NEW and compare with DIR

For a change that must leave behaviour unchanged (a restructure): record before it, compare after. Every
Parquet table an experiment writes (``parts/`` aside) must hold the same rows in the same order, with
non-float columns identical and float columns within 1e-6 (absolute or relative); every number in
``summary.json`` and ``run.json`` likewise, except wall times and the package version. Commands run one at a
time (two 2-thread torch jobs thrash) in the current environment.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

#: name -> the command's arguments (the output folder is appended as --out DIR/name).
RUNS = {
    "step_importance": ["-m", "experiments.step_importance", "--limit", "48"],
    "position_patching": ["-m", "experiments.position_patching", "--limit", "48"],
    "iterative_patching": ["-m", "experiments.iterative_patching", "--limit", "16"],
    "read_thoughts": ["-m", "experiments.read_thoughts", "--limit", "100"],
    "ablation_attention": ["-m", "experiments.ablation_attention", "--limit", "24"],
    "toy_model_report": ["-m", "experiments.toy_model_report", "--limit", "300"],
    "make_pairs": ["-m", "experiments.make_pairs", "--data", "gsm8k:test"],
    "train_saes": [
        "-m", "experiments.train_saes", "--sites", "thought.2.hook_hidden,thought.4.hook_hidden",
        "--train-limit", "400", "--limit", "50", "--splice-limit", "20", "--training-samples", "20000",
    ],
    "sae_features": ["-m", "experiments.sae_features", "--saes", "{out}/train_saes", "--limit", "50",
                     "--intervene", "2"],
    "feature_pathways": ["-m", "experiments.feature_pathways", "--saes", "{out}/train_saes", "--limit", "50",
                         "--candidates", "8"],
}  # fmt: skip
#: Keys whose values differ between any two runs.
VOLATILE = ("wall", "seconds", "package_version", "elapsed", "per_hour", "per_second", "throughput", "_s")
TOLERANCE = 1e-6


def run_all(out: Path, python: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name, args in RUNS.items():
        command = [python, *[a.replace("{out}", str(out)) for a in args], "--out", str(out / name)]
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True)
        print(f"{name}: exit {done.returncode} in {time.perf_counter() - start:.0f} s", flush=True)
        if done.returncode != 0:
            raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")


def _close(a, b) -> bool:
    if isinstance(a, bool) or isinstance(b, bool) or not isinstance(a, (int, float)) or not isinstance(b, (int, float)):
        return a == b
    if math.isnan(a) and math.isnan(b):
        return True
    return abs(a - b) <= TOLERANCE * max(1.0, abs(a), abs(b))


def compare_json(a, b, where: str, problems: list[str]) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if any(word in key for word in VOLATILE):
                continue
            if key not in a or key not in b:
                problems.append(f"{where}.{key}: present on one side only")
                continue
            compare_json(a[key], b[key], f"{where}.{key}", problems)
    elif isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            problems.append(f"{where}: {len(a)} vs {len(b)} items")
        for i, (x, y) in enumerate(zip(a, b)):
            compare_json(x, y, f"{where}[{i}]", problems)
    elif not _close(a, b):
        problems.append(f"{where}: {a!r} vs {b!r}")


def compare_table(a: pd.DataFrame, b: pd.DataFrame, where: str, problems: list[str]) -> None:
    if list(a.columns) != list(b.columns):
        problems.append(f"{where}: columns {list(a.columns)} vs {list(b.columns)}")
        return
    if len(a) != len(b):
        problems.append(f"{where}: {len(a)} vs {len(b)} rows")
        return
    for column in a.columns:
        x, y = a[column], b[column]
        if x.dtype.kind == "f" and y.dtype.kind == "f":
            xv, yv = x.to_numpy(dtype=float), y.to_numpy(dtype=float)
            same = np.isclose(xv, yv, rtol=TOLERANCE, atol=TOLERANCE, equal_nan=True)
            if not same.all():
                worst = int(np.nanargmax(np.where(same, 0, np.abs(xv - yv))))
                problems.append(f"{where}[{column}]: {int((~same).sum())} rows differ, e.g. {xv[worst]} vs {yv[worst]}")
        else:
            left = x.map(lambda v: json.dumps(v.tolist() if hasattr(v, "tolist") else v, default=str))
            right = y.map(lambda v: json.dumps(v.tolist() if hasattr(v, "tolist") else v, default=str))
            if not left.equals(right):
                problems.append(f"{where}[{column}]: {int((left != right).sum())} rows differ")


def compare_folders(old: Path, new: Path) -> list[str]:
    problems: list[str] = []
    for path in sorted(old.rglob("*")):
        relative = path.relative_to(old)
        if "parts" in relative.parts or path.is_dir():
            continue
        other = new / relative
        if path.suffix in (".parquet", ".json") and not other.exists():
            problems.append(f"{relative}: missing")
            continue
        if path.suffix == ".parquet":
            compare_table(pd.read_parquet(path), pd.read_parquet(other), str(relative), problems)
        elif path.name in ("summary.json", "run.json"):
            # Paths inside the snapshot folder (an SAE folder a later run reads) are named relative to it.
            recorded = json.loads(path.read_text().replace(str(old.resolve()), "{snapshot}"))
            rerun = json.loads(other.read_text().replace(str(new.resolve()), "{snapshot}"))
            compare_json(recorded, rerun, str(relative), problems)
    return problems


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["record", "compare"])
    parser.add_argument("recorded", type=Path)
    parser.add_argument("new", type=Path, nargs="?")
    args = parser.parse_args(argv)
    if args.action == "record":
        run_all(args.recorded, sys.executable)
        return
    if args.new is None:
        parser.error("compare needs the folder of the new runs")
    if not args.new.exists():
        run_all(args.new, sys.executable)
    problems = compare_folders(args.recorded, args.new)
    tables = sum(1 for p in args.recorded.rglob("*.parquet") if "parts" not in p.parts)
    print(f"compared {tables} tables and the summaries of {len(RUNS)} runs: {len(problems)} differences")
    for line in problems:
        print("  " + line)
    raise SystemExit(1 if problems else 0)


if __name__ == "__main__":
    main()
