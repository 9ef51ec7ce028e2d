"""Math word-problem data: GSM8K-format records from a local JSONL file or a hub dataset name.

Every record keeps its provenance (source and split) and its gold answer parsed with upstream's
rule. Difficulty is the number of ``<<...>>`` calculator spans in the solution.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd

from codi_lens.answers import parse_gold_answer

CALC_SPAN = re.compile(r"<<([^<>]*)>>")
#: Where the repository keeps GSM8K (MIT licence) beside the checkout.
SHARED_GSM8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k"


@dataclass(frozen=True)
class Problem:
    """One math word problem.

    Attributes:
        id: ``"{source}:{split}:{index}"``, stable across runs.
        question: the question text as stored (the model cleans it with upstream's rule).
        solution: the GSM8K-format solution (calculator spans, final ``#### N`` line).
        gold: the parsed gold answer.
        n_steps: number of ``<<...>>`` calculator spans (difficulty).
        source, split, index: provenance.
        intermediates: the result of each calculator span in order (``<<a*b=c>>`` gives c), the
            ground truth for logit-lens and probing; spans whose result is not a number are skipped.
    """

    id: str
    question: str
    solution: str
    gold: float
    n_steps: int
    source: str
    split: str
    index: int
    intermediates: tuple[float, ...] = ()


def count_steps(solution: str) -> int:
    """Number of ``<<...>>`` calculator spans in a solution."""
    return len(CALC_SPAN.findall(solution))


def span_results(solution: str) -> tuple[float, ...]:
    """The result of every ``<<expr=result>>`` span, in order (non-numeric results skipped)."""
    results = []
    for span in CALC_SPAN.findall(solution):
        value = span.rsplit("=", 1)[-1].replace(",", "").strip()
        try:
            results.append(float(value))
        except ValueError:
            continue
    return tuple(results)


def _records_from_jsonl(path: Path) -> list[dict]:
    rows = []
    with open(path) as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{line_no}: not valid JSON ({exc.msg})") from exc
    return rows


def _records_from_hub(name: str, split: str) -> list[dict]:
    """Rows of a hub dataset (needs the ``datasets`` package and network or a local HF cache)."""
    try:
        from datasets import load_dataset
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("loading a hub dataset needs the 'datasets' package") from exc
    config = "main" if name in ("gsm8k", "openai/gsm8k") else None
    return [dict(r) for r in load_dataset(name, config, split=split)]


def load_problems(
    source: str | Path,
    *,
    split: str | None = None,
    question_field: str = "question",
    answer_field: str = "answer",
    limit: int | None = None,
) -> list[Problem]:
    """Load GSM8K-format problems.

    Args:
        source: a local ``.jsonl`` path (one ``{"question", "answer"}`` object per line) or a hub
            dataset name such as ``"openai/gsm8k"`` (then ``split`` is required).
        split: recorded as provenance; for a local file defaults to the file's stem.
        question_field, answer_field: field names in each record.
        limit: keep only the first ``limit`` problems.
    """
    path = Path(source)
    if path.is_file():
        rows, split = _records_from_jsonl(path), split or path.stem
        source_name = path.parent.name or str(path)
    elif path.suffix == ".jsonl" or path.is_dir():
        raise FileNotFoundError(f"no JSONL file at {str(path)!r}")
    else:
        if split is None:
            raise ValueError(f"split is required to load hub dataset {source!r}")
        rows, source_name = _records_from_hub(str(source), split), str(source)
    problems = []
    for index, row in enumerate(rows[:limit] if limit is not None else rows):
        for needed in (question_field, answer_field):
            if needed not in row:
                raise KeyError(f"{source}: record {index} has no field {needed!r} (fields: {sorted(row)})")
        solution = str(row[answer_field])
        problems.append(
            Problem(
                id=f"{source_name}:{split}:{index}",
                question=row[question_field],
                solution=solution,
                gold=parse_gold_answer(solution),
                n_steps=count_steps(solution),
                source=source_name,
                split=split,
                index=index,
                intermediates=span_results(solution),
            )
        )
    return problems


def problems_frame(problems: list[Problem]) -> pd.DataFrame:
    """The problems as a tidy DataFrame, one row per problem."""
    return pd.DataFrame([asdict(p) for p in problems])
