"""Clean/corrupted pairs that change one number in a question, with the answer recomputed from the chain.

    python -m experiments.make_pairs [--data toy-chain:test] [--limit N] [--deltas 1,-1,2,-2] [--out DIR]
    python -m experiments.make_pairs --import FILE [--data gsm8k:test] [--out DIR]

Building: for each problem, the question's integers are tried in order, each changed by each delta,
and the first change whose re-evaluated chain passes every check gives the pair (see
``codi_lens.data.pairs`` for the checks and the rejection reasons). Data from the shipped synthetic sets
(``toy-chain:test``, ``toy:test``) keeps values in the models' number range (0..40).

Checking (``--import FILE``): a JSON list or JSONL of ``clean_question``, ``corrupted_question`` and
optionally ``pair_id``, ``clean_answer``, ``corrupted_answer``. Each clean question is matched in
GSM8K (both splits, as shipped; or ``--data`` when given), the changed number is found, both answers
are recomputed and compared with the claimed ones.

Writes to ``--out`` (default ``results/make_pairs``): ``pairs.parquet`` (``pair_id, clean_id,
clean_question, corrupted_question, clean_answer, corrupted_answer, changed_from, changed_to, ...``)
and ``rejections.parquet`` (every rejected candidate, by reason), or ``import_report.parquet``
(``pair_id, status, reason, claimed_corrupted_answer, recomputed_corrupted_answer, ...``) with
``pairs.parquet`` (the pairs that agree, with the recomputed answers, ready for ``position_patching
--pairs``); and ``summary.json`` with the counts by reason. No usable pair: the counts are written and the
command stops with one ``error:`` line (exit status 2). This needs no model.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from codi_lens.core.errors import FlagError
from codi_lens.data import load_problems
from codi_lens.data.pairs import DEFAULT_DELTAS, check_pairs, make_pairs, read_pair_file
from codi_lens.data.problems import DataError
from codi_lens.data.synthetic import value_limit
from codi_lens.loading import DEFAULT_MODEL, default_data
from codi_lens.reports.pairs import write_import_report, write_pairs
from codi_lens.run.cli import check_out, run_main
from codi_lens.run.outcome import NothingToMeasureError, counts_text


def parse_deltas(text: str) -> list[float]:
    """``--deltas``: the changes to try, comma-separated numbers."""
    try:
        deltas = [float(d) for d in text.split(",") if d.strip()]
    except ValueError:
        raise FlagError(f"--deltas must be comma-separated numbers, got {text!r}") from None
    if not deltas:
        raise FlagError("--deltas is empty: give at least one change to try")
    return deltas


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--data", default=None, help="problems (default: the default model's test split; with --import: GSM8K)"
    )
    parser.add_argument("--split", default=None, help="split name (required for a hub dataset)")
    parser.add_argument("--limit", type=int, default=None, help="the first N records in file order")
    parser.add_argument("--deltas", default=",".join(str(d) for d in DEFAULT_DELTAS), help="changes to try, in order")
    parser.add_argument("--max-value", type=float, default=None, help="largest value allowed (toy data: 40)")
    parser.add_argument("--import", dest="import_file", default=None, help="check a pair file made elsewhere")
    parser.add_argument("--out", default="results/make_pairs", help="output folder")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = parser.parse_args(argv)
    check_out(args.out)
    if args.limit is not None and args.limit < 1:
        raise FlagError(f"--limit must be at least 1, got {args.limit}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.import_file:
        problems = load_problems(args.data, split=args.split, limit=args.limit) if args.data else None
        report = check_pairs(read_pair_file(args.import_file), problems)
        summary = {"pair_file": str(args.import_file), **write_import_report(report, out)}
    else:
        deltas = parse_deltas(args.deltas)
        data = args.data or default_data(DEFAULT_MODEL)
        problems = load_problems(data, split=args.split, limit=args.limit)
        if not problems:
            raise DataError(f"--data {data}: no problems to make pairs from (the source holds no records)")
        max_value = args.max_value if args.max_value is not None else value_limit(problems)
        pairs, rejections = make_pairs(problems, deltas=deltas, max_value=max_value)
        summary = {"data": data, "n_problems": len(problems), **write_pairs(pairs, rejections, out)}
        summary |= {"deltas": deltas, "max_value": max_value}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    if not args.import_file and not summary["n_pairs"]:  # a check's report is its result, even when all disagree
        reasons = summary["problems_without_pair_by_first_reason"]
        raise NothingToMeasureError(f"no usable pair ({counts_text(reasons)}); counts in {out / 'summary.json'}")
    return summary


if __name__ == "__main__":
    run_main(main)
