"""Math word problems: one :class:`Problem` type for GSM8K, local JSONL files and the synthetic data.

Every problem carries its provenance (source, split, index in the file) and its gold answer parsed with
upstream's rule. Difficulty is the number of ``<<...>>`` calculator spans in the solution; past CODI work
grouped GSM8K into the buckets of :data:`DIFFICULTY_BUCKETS`. Where problems come from is
:mod:`codi_lens.data.sources`.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass

import pandas as pd

from codi_lens.core.answers import parse_gold_answer
from codi_lens.core.errors import CodiLensError

CALC_SPAN = re.compile(r"<<([^<>]*)>>")


class DataError(CodiLensError, ValueError):
    """A data source that cannot be read as GSM8K-format problems (names the file and record)."""


@dataclass(frozen=True)
class Problem:
    """One math word problem.

    Attributes:
        id: the record's own ``id`` when it has one, else ``"{source}:{split}:{index}"`` where
            ``source`` is the shipped dataset's name or, for a local file, its stem and a digest of its
            content (two files named ``test.jsonl`` in different folders get different ids).
        question: the question text as stored (the model cleans it with upstream's rule).
        solution: the GSM8K-format solution (calculator spans, final ``#### N`` line).
        gold: the parsed gold answer.
        n_steps: number of ``<<...>>`` calculator spans (difficulty).
        source, split, index: provenance (``index`` is the record's line among the file's records).
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

    @property
    def cot(self) -> str:
        """The equation-only chain of thought (GSM8k-Aug format): ``"<<a*b=c>> <<c+d=e>>"``."""
        return " ".join(f"<<{span}>>" for span in CALC_SPAN.findall(self.solution))

    @property
    def answer_value(self) -> int | float:
        """The gold answer as the model writes it: an int when it is a whole number."""
        return int(self.gold) if float(self.gold).is_integer() else self.gold


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


def problem_from_record(
    row: dict, *, source: str, split: str, index: int, question_field: str = "question", answer_field: str = "answer"
) -> Problem:
    """Build a :class:`Problem` from one GSM8K-format record (raises :class:`DataError` naming the field)."""
    for needed in (question_field, answer_field):
        if needed not in row:
            raise DataError(f"{source}: record {index} has no field {needed!r} (fields: {sorted(row)})")
    solution = str(row[answer_field])
    try:
        gold = parse_gold_answer(solution)
    except ValueError as exc:
        raise DataError(f"{source}: record {index}: {exc}") from exc
    return Problem(
        id=str(row["id"]) if row.get("id") is not None else f"{source}:{split}:{index}",
        question=row[question_field],
        solution=solution,
        gold=gold,
        n_steps=count_steps(solution),
        source=source,
        split=split,
        index=index,
        intermediates=span_results(solution),
    )


def records_from_jsonl(text: str, name: str) -> list[dict]:
    """One JSON object per non-empty line (raises :class:`DataError` naming ``name`` and the line)."""
    rows = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise DataError(f"{name}:{line_no}: not valid JSON ({exc.msg})") from exc
    return rows


def problems_fingerprint(problems: list[Problem]) -> str:
    """A digest of the problems' ids, questions and gold answers (recorded in ``run.json``)."""
    digest = hashlib.sha256()
    for p in problems:
        digest.update(f"{p.id}\t{p.question}\t{p.gold}\n".encode())
    return digest.hexdigest()


def problems_frame(problems: list[Problem]) -> pd.DataFrame:
    """The problems as a tidy DataFrame, one row per problem."""
    return pd.DataFrame([asdict(p) for p in problems])


#: Difficulty buckets by number of calculator spans, as past CODI work grouped GSM8K.
DIFFICULTY_BUCKETS = ("<=2", "3", "4", "5+")


def difficulty_bucket(n_steps: int) -> str:
    """``"<=2"``, ``"3"``, ``"4"`` or ``"5+"``."""
    if n_steps <= 2:
        return "<=2"
    return "5+" if n_steps >= 5 else str(n_steps)


def stratified_sample(
    problems: list[Problem], n_per_bucket: int, *, seed: int, report: Callable[[str], None] | None = None
) -> list[Problem]:
    """Up to ``n_per_bucket`` problems from each difficulty bucket, returned in their original order.

    Each bucket's problems are put in one seeded order (``random.Random(f"{seed}:{bucket}")``, independent of
    ``n_per_bucket`` and of the other buckets) and the first ``n_per_bucket`` are taken, so a smaller sample
    with the same seed is a subset of a larger one. A bucket with fewer problems gives all of them, and
    ``report`` (if given) is told so."""
    chosen: set[int] = set()
    for bucket in DIFFICULTY_BUCKETS:
        members = [i for i, p in enumerate(problems) if difficulty_bucket(p.n_steps) == bucket]
        random.Random(f"{seed}:{bucket}").shuffle(members)
        if len(members) < n_per_bucket and report is not None:
            report(f"bucket {bucket} holds {len(members)} problems, fewer than {n_per_bucket}: taking all of them")
        chosen.update(members[:n_per_bucket])
    return [p for i, p in enumerate(problems) if i in chosen]
