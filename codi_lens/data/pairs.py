"""Clean/corrupted pairs: change one number in a question and recompute the answer from the chain.

A GSM8K-format solution carries its computation as calculator spans, ``<<48/2=24>> <<48+24=72>>``.
To corrupt a problem, one integer of the question is changed (``48 -> 49``) and the chain is
re-evaluated: an operand equal to the changed number takes the new value, an operand equal to an
earlier span's result takes that span's new result, every other operand is a constant. The
corrupted answer is the last span's new result. The same holds for the shipped synthetic problems,
whose chains are their programs.

A pair is rejected, never guessed, and the reason is recorded (:class:`Reason`) when:

- the number occurs more than once in the question, or plays several roles in the chain (it is
  used twice, or equals an earlier result it could stand for), or is not used in the chain at all;
- a span cannot be evaluated, or its stated result differs from its expression (rounded spans), or
  the chain does not end at the gold answer;
- the answer does not change, is not an integer, or a value turns negative (counts of things);
- (with ``max_value``) a value leaves the range the model can write in one token.

:func:`make_pairs` builds pairs from problems; :func:`check_pairs` checks pairs made elsewhere
against GSM8K (or any problem list) and says, for each, whether its claimed answers agree with the
recomputed ones.
"""

from __future__ import annotations

import ast
import json
import math
import operator
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from enum import StrEnum
from pathlib import Path

import pandas as pd

from codi_lens.core.errors import MissingFileError
from codi_lens.data.problems import CALC_SPAN, DataError, Problem, records_from_jsonl
from codi_lens.data.sources import load_problems

#: An integer or decimal in a question, with optional thousands separators ("1,200").
QUESTION_NUMBER = re.compile(r"(?<![\d.,])\d{1,3}(?:,\d{3})+(?:\.\d+)?(?![\d])|(?<![\d.,])\d+(?:\.\d+)?(?![\d])")
DEFAULT_DELTAS = (1, -1, 2, -2)


class Reason(StrEnum):
    """Why a candidate corruption was rejected."""

    NO_NUMBER = "no integer in the question"
    NO_CHAIN = "no calculator spans in the solution"
    REPEATED_IN_QUESTION = "the number occurs more than once in the question"
    NOT_IN_CHAIN = "the number is not used in the chain"
    SEVERAL_ROLES = "the number plays several roles in the chain"
    NOT_EVALUABLE = "a span cannot be re-evaluated"
    STATED_RESULT_DIFFERS = "a span's stated result differs from its expression"
    NOT_AT_GOLD = "the chain does not end at the gold answer"
    UNCHANGED = "the answer does not change"
    NOT_INTEGER = "the corrupted answer is not an integer"
    NEGATIVE = "a value turns negative"
    ODD_HALVING = "an odd value would be halved"
    OUT_OF_RANGE = "a value leaves the model's number range"
    NOT_FOUND = "the clean question is not in the problem set"
    NOT_ONE_NUMBER = "the questions do not differ in exactly one number"


class Rejected(Exception):
    def __init__(self, reason: Reason, detail: str = ""):
        super().__init__(reason.value + (f": {detail}" if detail else ""))
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class Pair:
    """A clean problem and its corruption (answers as numbers; ``changed_at``: the character offset
    of the changed number in the clean question)."""

    pair_id: str
    clean_id: str
    clean_question: str
    corrupted_question: str
    clean_answer: float
    corrupted_answer: float
    changed_from: float
    changed_to: float
    changed_at: int
    n_steps: int
    source: str
    split: str


# ---------------------------------------------------------------------- the chain
_OPERATORS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}


def _number(text: str) -> float:
    return float(text.replace(",", "").strip())


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _evaluate(node: ast.AST, value_of) -> float:
    """Evaluate an arithmetic expression tree; ``value_of(constant)`` maps each operand."""
    if isinstance(node, ast.Expression):
        return _evaluate(node.body, value_of)
    if isinstance(node, ast.Constant) and _is_number(node.value):
        return value_of(float(node.value))
    if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
        left, right = _evaluate(node.left, value_of), _evaluate(node.right, value_of)
        if isinstance(node.op, ast.Pow) and abs(right) > 10:
            raise Rejected(Reason.NOT_EVALUABLE, "exponent too large")
        try:
            return float(_OPERATORS[type(node.op)](left, right))
        except ZeroDivisionError as exc:
            raise Rejected(Reason.NOT_EVALUABLE, "division by zero") from exc
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        operand = node.operand
        if isinstance(node.op, ast.USub) and isinstance(operand, ast.Constant) and _is_number(operand.value):
            return value_of(-float(operand.value))  # "-3" writes the value -3 (an earlier result), not 3
        value = _evaluate(operand, value_of)
        return -value if isinstance(node.op, ast.USub) else value
    raise Rejected(Reason.NOT_EVALUABLE, f"unsupported syntax {type(node).__name__}")


@dataclass(frozen=True)
class Span:
    """One calculator span ``<<expression=result>>``."""

    expression: str
    result: float
    tree: ast.Expression


def parse_chain(solution: str) -> list[Span]:
    """The calculator spans of a solution, parsed (raises :class:`Rejected` naming the span)."""
    spans = []
    for raw in CALC_SPAN.findall(solution):
        if "=" not in raw:
            raise Rejected(Reason.NOT_EVALUABLE, f"<<{raw}>> has no '='")
        expression, result = raw.rsplit("=", 1)
        try:
            tree = ast.parse(expression.replace(",", "").strip(), mode="eval")
            value = _number(result)
        except (SyntaxError, ValueError) as exc:
            raise Rejected(Reason.NOT_EVALUABLE, f"<<{raw}>>") from exc
        spans.append(Span(expression.strip(), value, tree))
    if not spans:
        raise Rejected(Reason.NO_CHAIN)
    return spans


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)


def recompute_chain(spans: Sequence[Span], old: float, new: float) -> list[float]:
    """Every span's result after replacing the question's number ``old`` by ``new`` (see the module
    docstring for how operands are traced). Raises :class:`Rejected` with the reason."""
    results_old: list[float] = []
    results_new: list[float] = []
    uses = 0
    for span in spans:
        if not _close(_evaluate(span.tree, lambda c: c), span.result):
            raise Rejected(Reason.STATED_RESULT_DIFFERS, f"<<{span.expression}={span.result:g}>>")

        def value_of(constant: float) -> float:
            nonlocal uses
            earlier = {results_new[i] for i, r in enumerate(results_old) if _close(r, constant)}
            if _close(constant, old):
                if earlier:
                    raise Rejected(Reason.SEVERAL_ROLES, f"{old:g} is also an earlier result")
                uses += 1
                return new
            if len(earlier) > 1:
                raise Rejected(Reason.SEVERAL_ROLES, f"{constant:g} matches earlier results that now differ")
            return earlier.pop() if earlier else constant

        results_new.append(_evaluate(span.tree, value_of))
        results_old.append(span.result)
    if uses == 0:
        raise Rejected(Reason.NOT_IN_CHAIN, f"{old:g}")
    if uses > 1:
        raise Rejected(Reason.SEVERAL_ROLES, f"{old:g} is used {uses} times")
    return results_new


def recompute_from_step(spans: Sequence[Span], step: int, value: float, question_values: Iterable[float]) -> float:
    """The final result of a chain whose span ``step`` (1-based) gives ``value`` instead of its own result, every
    later span recomputed: an operand equal to an earlier result is that result. Refused (:class:`Rejected`) when
    an operand could be either an earlier result or a number of the question (``question_values``), matches
    earlier results that now differ, or no later span uses the step's result (the answer does not depend on it)."""
    if not 1 <= step <= len(spans):
        raise Rejected(Reason.NOT_IN_CHAIN, f"step {step} of {len(spans)}")
    given = list(question_values)
    old = [span.result for span in spans]
    new = old[: step - 1] + [float(value)]
    uses = 0

    def value_of(constant: float) -> float:
        nonlocal uses
        earlier = {new[i] for i in range(len(new)) if _close(old[i], constant)}
        uses += _close(constant, old[step - 1])
        if earlier and any(_close(constant, q) for q in given):
            raise Rejected(Reason.SEVERAL_ROLES, f"{constant:g} is a number of the question and an earlier result")
        if len(earlier) > 1:
            raise Rejected(Reason.SEVERAL_ROLES, f"{constant:g} matches earlier results that now differ")
        return earlier.pop() if earlier else constant

    for span in spans[step:]:
        new.append(_evaluate(span.tree, value_of))
    if step < len(spans) and not uses:
        raise Rejected(Reason.NOT_IN_CHAIN, f"no later step uses step {step}'s result")
    return new[-1]


def recompute_program(spans: Sequence[Span], number_index: int, new: float) -> list[float]:
    """Every result of a synthetic chain (:mod:`codi_lens.data.synthetic`) after its question's number
    ``number_index`` becomes ``new``. The chain is a program: the start value (number 0), then one
    operation a day whose operand is the question's next number (halving has none: its 2 is not
    written in the question). Halving an odd value is refused (the story keeps whole things)."""
    steps = []
    for span in spans:
        node = span.tree.body
        if not (
            isinstance(node, ast.BinOp) and isinstance(node.left, ast.Constant) and isinstance(node.right, ast.Constant)
        ):
            raise Rejected(Reason.NOT_EVALUABLE, f"<<{span.expression}>> is not one synthetic operation")
        steps.append((type(node.op), float(node.left.value), float(node.right.value)))
    operands = [steps[0][1]] + [x for op, _, x in steps if op not in (ast.Div, ast.FloorDiv)]
    if not 0 <= number_index < len(operands):
        raise Rejected(Reason.NOT_IN_CHAIN, f"number {number_index} of the question")
    operands[number_index] = new
    value, written, results = operands[0], iter(operands[1:]), []
    for op, _, _ in steps:
        if op in (ast.Div, ast.FloorDiv):
            if op is ast.Div and value % 2:
                raise Rejected(Reason.ODD_HALVING, f"halving {value:g}")
            value = value // 2
        else:
            value = _OPERATORS[op](value, next(written))
        results.append(float(value))
    return results


def question_numbers(question: str) -> list[tuple[int, str, float]]:
    """``(character offset, text, value)`` of every number written with digits in a question."""
    return [(m.start(), m.group(), _number(m.group())) for m in QUESTION_NUMBER.finditer(question)]


def _format_number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def corrupt(problem: Problem, changed_at: int, new_value: float, *, max_value: float | None = None) -> Pair:
    """The pair changing the number at character offset ``changed_at`` of the question to
    ``new_value`` (raises :class:`Rejected` with the reason)."""
    numbers = question_numbers(problem.question)
    found = [n for n in numbers if n[0] == changed_at]
    if not found:
        raise Rejected(Reason.NO_NUMBER, f"no number at character {changed_at}")
    _, text, old = found[0]
    spans = parse_chain(problem.solution)
    if not _close(spans[-1].result, problem.gold):
        raise Rejected(Reason.NOT_AT_GOLD, f"last span gives {spans[-1].result:g}, gold is {problem.gold:g}")
    if problem.source == "toy":  # the synthetic generator's program: the number's role is known
        results = recompute_program(spans, numbers.index(found[0]), new_value)
    else:
        if sum(_close(v, old) for _, _, v in numbers) > 1:
            raise Rejected(Reason.REPEATED_IN_QUESTION, f"{text}")
        results = recompute_chain(spans, old, new_value)
    answer = results[-1]
    if _close(answer, problem.gold):
        raise Rejected(Reason.UNCHANGED)
    if not float(answer).is_integer():
        raise Rejected(Reason.NOT_INTEGER, f"{answer:g}")
    if min([new_value, *results]) < 0:
        raise Rejected(Reason.NEGATIVE)
    if max_value is not None and max([new_value, *results]) > max_value:
        raise Rejected(Reason.OUT_OF_RANGE, f"above {max_value:g}")
    new_text = _format_number(new_value)
    corrupted = problem.question[:changed_at] + new_text + problem.question[changed_at + len(text) :]
    return Pair(
        pair_id=f"{problem.id}|{changed_at}:{text}->{new_text}",
        clean_id=problem.id,
        clean_question=problem.question,
        corrupted_question=corrupted,
        clean_answer=problem.gold,
        corrupted_answer=answer,
        changed_from=old,
        changed_to=new_value,
        changed_at=changed_at,
        n_steps=problem.n_steps,
        source=problem.source,
        split=problem.split,
    )


def make_pairs(
    problems: Iterable[Problem], *, deltas: Sequence[float] = DEFAULT_DELTAS, max_value: float | None = None
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """At most one pair per problem: the first candidate that passes, trying the question's integers
    in order and, for each, ``value + delta`` for ``delta`` in ``deltas``.

    Returns ``(pairs, rejections)``: ``pairs`` has one row per :class:`Pair`; ``rejections`` one row
    per failed candidate (``problem_id, changed_from, changed_to, reason, detail``) and a row with
    ``changed_from`` NaN for a problem with no integer at all. ``has_pair`` tells whether the problem
    got a pair in the end.
    """
    pairs, rejections = [], []
    for problem in problems:
        tried = []
        candidates = [(at, v) for at, _, v in question_numbers(problem.question) if float(v).is_integer()]
        if not candidates:
            tried.append(_rejection(problem, math.nan, math.nan, Rejected(Reason.NO_NUMBER)))
        pair = None
        for at, value in candidates:
            for delta in deltas:
                try:
                    pair = corrupt(problem, at, value + delta, max_value=max_value)
                    break
                except Rejected as rejected:
                    tried.append(_rejection(problem, value, value + delta, rejected))
                    if rejected.reason in _NUMBER_LEVEL:  # the same for every delta of this number
                        break
            if pair is not None:
                break
        if pair is not None:
            pairs.append(asdict(pair))
        rejections.extend({**row, "has_pair": pair is not None} for row in tried)
    pair_columns = list(Pair.__dataclass_fields__)
    rejection_columns = ["problem_id", "changed_from", "changed_to", "reason", "detail", "has_pair"]
    return pd.DataFrame(pairs, columns=pair_columns), pd.DataFrame(rejections, columns=rejection_columns)


_NUMBER_LEVEL = {
    Reason.REPEATED_IN_QUESTION,
    Reason.NOT_IN_CHAIN,
    Reason.SEVERAL_ROLES,
    Reason.NO_CHAIN,
    Reason.NOT_AT_GOLD,
    Reason.STATED_RESULT_DIFFERS,
}


def _rejection(problem: Problem, old: float, new: float, rejected: Rejected) -> dict:
    return {
        "problem_id": problem.id,
        "changed_from": old,
        "changed_to": new,
        "reason": rejected.reason.value,
        "detail": rejected.detail,
    }


#: The columns a pair table needs to be patched (``make_pairs`` writes them, with more).
PAIR_COLUMNS = ("pair_id", "clean_question", "corrupted_question", "clean_answer", "corrupted_answer")


def read_pair_table(path: str | Path) -> pd.DataFrame:
    """A ``pairs.parquet`` (as ``experiments.make_pairs`` writes it), checked to hold :data:`PAIR_COLUMNS`."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"no pairs file at {str(path)!r}")
    pairs = pd.read_parquet(path)
    missing = sorted(set(PAIR_COLUMNS) - set(pairs))
    if missing:
        raise DataError(f"{path} lacks the column {missing[0]!r} (a pair table needs {', '.join(PAIR_COLUMNS)})")
    return pairs


# ---------------------------------------------------------------------- pairs made elsewhere
def checked_pair_table(report: pd.DataFrame) -> pd.DataFrame:
    """The pairs of a :func:`check_pairs` report that agree, as a pair table (:data:`PAIR_COLUMNS` with the
    recomputed answers, ``clean_id``, ``n_steps``, ``changed_from``, ``changed_to``), the imported ids kept."""
    agreeing = report[report["status"] == "agrees"]
    table = agreeing.rename(
        columns={"recomputed_clean_answer": "clean_answer", "recomputed_corrupted_answer": "corrupted_answer"}
    )
    columns = [*PAIR_COLUMNS, "clean_id", "n_steps", "changed_from", "changed_to"]
    return table[columns].astype({"n_steps": int}).reset_index(drop=True)


def read_pair_file(path: str | Path) -> list[dict]:
    """Rows of a JSON list or JSONL file of pairs (raises :class:`DataError` naming the line)."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"no pair file at {str(path)!r}")
    text = path.read_text()
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from exc
    else:
        rows = records_from_jsonl(text, str(path))
    for i, row in enumerate(rows):
        missing = [f for f in ("clean_question", "corrupted_question") if f not in row]
        if missing:
            raise DataError(f"{path}: pair {i} has no field {missing[0]!r} (fields: {sorted(row)})")
    return rows


def _normalised(question: str) -> str:
    return " ".join(question.split())


def _claimed(value) -> float | None:
    if value is None:
        return None
    try:
        return _number(str(value))
    except ValueError:
        return math.nan


def check_pairs(rows: Sequence[dict], problems: Iterable[Problem] | None = None) -> pd.DataFrame:
    """Check pairs made elsewhere: match each clean question (whitespace-normalised) in ``problems``
    (default: GSM8K train and test, as shipped), find the one number that changed, recompute both
    answers and compare them with the claimed ones.

    Returns one row per pair: ``pair_id, status`` (``"agrees"``, ``"disagrees"`` or ``"rejected"``),
    ``reason``, the claimed and recomputed clean and corrupted answers, ``clean_id``, ``n_steps``,
    ``changed_from``, ``changed_to``, ``clean_question``, ``corrupted_question``. A pair that gives no
    claimed answers agrees when it can be recomputed. :func:`checked_pair_table` turns the agreeing rows
    into a pair table patching reads.
    """
    if problems is None:
        problems = [*load_problems("gsm8k:train"), *load_problems("gsm8k:test")]
    by_question = {}
    for p in problems:
        by_question.setdefault(_normalised(p.question), p)
    report = []
    for i, row in enumerate(rows):
        entry = {
            "pair_id": str(row.get("pair_id", i)),
            "status": "rejected",
            "reason": "",
            "claimed_clean_answer": _claimed(row.get("clean_answer")),
            "recomputed_clean_answer": math.nan,
            "claimed_corrupted_answer": _claimed(row.get("corrupted_answer")),
            "recomputed_corrupted_answer": math.nan,
            "clean_id": None,
            "n_steps": math.nan,
            "changed_from": math.nan,
            "changed_to": math.nan,
            "clean_question": row["clean_question"],
            "corrupted_question": row["corrupted_question"],
        }
        try:
            problem = by_question.get(_normalised(row["clean_question"]))
            if problem is None:
                raise Rejected(Reason.NOT_FOUND)
            which, new = changed_number(problem.question, row["corrupted_question"])
            pair = corrupt(problem, question_numbers(problem.question)[which][0], new)
            entry.update(
                clean_id=problem.id,
                n_steps=problem.n_steps,
                changed_from=pair.changed_from,
                changed_to=pair.changed_to,
                recomputed_clean_answer=pair.clean_answer,
                recomputed_corrupted_answer=pair.corrupted_answer,
            )
            agrees = all(
                claimed is None or (not math.isnan(claimed) and _close(claimed, recomputed))
                for claimed, recomputed in (
                    (entry["claimed_clean_answer"], pair.clean_answer),
                    (entry["claimed_corrupted_answer"], pair.corrupted_answer),
                )
            )
            entry["status"] = "agrees" if agrees else "disagrees"
        except Rejected as rejected:
            entry["reason"] = str(rejected)
        report.append(entry)
    return pd.DataFrame(report)


def changed_number(clean: str, corrupted: str) -> tuple[int, float]:
    """Which number of ``clean`` (its index among the question's numbers) differs, and its new value,
    for two questions that are otherwise identical (up to whitespace)."""
    clean, corrupted = _normalised(clean), _normalised(corrupted)
    a, b = question_numbers(clean), question_numbers(corrupted)
    text_a = QUESTION_NUMBER.split(clean)
    text_b = QUESTION_NUMBER.split(corrupted)
    if len(a) != len(b) or text_a != text_b:
        raise Rejected(Reason.NOT_ONE_NUMBER)
    changed = [i for i, (x, y) in enumerate(zip(a, b)) if not _close(x[2], y[2])]
    if len(changed) != 1:
        raise Rejected(Reason.NOT_ONE_NUMBER, f"{len(changed)} numbers differ")
    return changed[0], b[changed[0]][2]
