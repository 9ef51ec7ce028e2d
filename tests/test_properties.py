"""Property-based tests (hypothesis) where inputs have structure: random arithmetic chains through the pair
re-evaluator, random left-padded batches through position resolution, random problem sets through the
stratified sampler.

References: a direct evaluation of each random chain's program (the chain is generated as a program of
operand references, so its corrupted answer is known without tracing values through text), positions written
out from the documented layout, and counts per difficulty bucket."""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from codi_lens import CODIPositions, PositionError
from codi_lens.core.positions import ChunkContext
from codi_lens.data import DIFFICULTY_BUCKETS, Problem, difficulty_bucket, problem_from_record, stratified_sample
from codi_lens.data.pairs import Reason, Rejected, corrupt, parse_chain, question_numbers, recompute_chain

OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv}


# ---------------------------------------------------------------------- random chains
@dataclass(frozen=True)
class Program:
    """A chain as a program: ``numbers`` are the question's numbers; each step is ``(left, op, right)`` with
    operands ``("q", i)`` (question number i) or ``("r", j)`` (step j's result)."""

    numbers: tuple[int, ...]
    steps: tuple[tuple[tuple[str, int], str, tuple[str, int]], ...]

    def run(self, numbers: tuple[float, ...]) -> list[float]:
        results: list[float] = []
        for left, op, right in self.steps:
            a, b = (numbers[i] if kind == "q" else results[i] for kind, i in (left, right))
            results.append(OPS[op](a, b))
        return results

    def question(self) -> str:
        return " ".join(f"Box {chr(65 + i)} holds {n} apples." for i, n in enumerate(self.numbers)) + " How many?"

    def solution(self) -> str:
        values = self.run(tuple(float(n) for n in self.numbers))
        spans = []
        for (left, op, right), value in zip(self.steps, values):
            a, b = (self.numbers[i] if kind == "q" else values[i] for kind, i in (left, right))
            spans.append(f"<<{_written(a)}{op}{_written(b)}={_written(value)}>>")
        return " ".join(spans) + f"\n#### {_written(values[-1])}"


def _written(value: float) -> str:
    """A value as a solution writes it: integers in full (no exponent), others as Python prints them."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


@st.composite
def programs(draw) -> Program:
    numbers = tuple(draw(st.lists(st.integers(1, 60), min_size=2, max_size=5, unique=True)))
    n_steps = draw(st.integers(1, 4))
    steps = []
    for j in range(n_steps):
        # each step reads the previous result (a chain) or, at the start, a question number
        left = ("r", j - 1) if j > 0 else ("q", draw(st.integers(0, len(numbers) - 1)))
        right = ("q", draw(st.integers(0, len(numbers) - 1)))
        steps.append((left, draw(st.sampled_from(list(OPS))), right))
    return Program(numbers, tuple(steps))


def _unambiguous(program: Program) -> bool:
    """Every value the chain writes (question numbers and results) is distinct and every result an integer, so
    tracing operands by value (what ``recompute_chain`` does with text) has one answer."""
    results = program.run(tuple(float(n) for n in program.numbers))
    written = [float(n) for n in program.numbers] + results
    return all(float(r).is_integer() for r in results) and len({round(v, 9) for v in written}) == len(written)


@settings(max_examples=300, deadline=None)
@given(programs(), st.data())
def test_recomputed_chain_equals_the_program_run_on_the_new_number(program, data):
    assume(_unambiguous(program))
    used = [i for step in program.steps for kind, i in (step[0], step[2]) if kind == "q"]
    which = data.draw(st.integers(0, len(program.numbers) - 1))
    new = float(program.numbers[which] + data.draw(st.sampled_from([1, -1, 2, -2, 7])))
    spans = parse_chain(program.solution())
    old = float(program.numbers[which])
    changed = list(map(float, program.numbers))
    changed[which] = new
    if used.count(which) == 0:
        with pytest.raises(Rejected) as rejected:
            recompute_chain(spans, old, new)
        assert rejected.value.reason == Reason.NOT_IN_CHAIN
        return
    if used.count(which) > 1:
        with pytest.raises(Rejected) as rejected:
            recompute_chain(spans, old, new)
        assert rejected.value.reason == Reason.SEVERAL_ROLES
        return
    try:
        expected = program.run(tuple(changed))
    except ZeroDivisionError:
        with pytest.raises(Rejected, match="division by zero"):
            recompute_chain(spans, old, new)
        return
    got = recompute_chain(spans, old, new)
    assert len(got) == len(expected)
    assert all(math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9) for a, b in zip(got, expected)), (got, expected)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(programs(), st.data())
def test_a_corrupted_pair_carries_the_programs_answer_or_the_reason_it_cannot(program, data):
    """Through the whole of ``corrupt``: the pair's corrupted question differs from the clean one in that number
    alone, and its answer is the program's; or it is refused for the reason the program's values give."""
    assume(_unambiguous(program))
    used = [i for step in program.steps for kind, i in (step[0], step[2]) if kind == "q"]
    which = data.draw(st.sampled_from(sorted(set(used))))
    assume(used.count(which) == 1)
    new = float(program.numbers[which] + data.draw(st.sampled_from([1, -1, 2, -2])))
    problem = problem_from_record(
        {"question": program.question(), "answer": program.solution()}, source="gsm8k", split="test", index=0
    )
    at = question_numbers(problem.question)[which][0]
    changed = list(map(float, program.numbers))
    changed[which] = new
    try:
        expected = program.run(tuple(changed))
    except ZeroDivisionError:
        expected = None
    try:
        pair = corrupt(problem, at, new)
    except Rejected as rejected:
        reason = rejected.reason
        if expected is None:
            assert reason == Reason.NOT_EVALUABLE
        elif math.isclose(expected[-1], problem.gold):
            assert reason == Reason.UNCHANGED
        elif not float(expected[-1]).is_integer():
            assert reason == Reason.NOT_INTEGER
        else:
            assert reason == Reason.NEGATIVE and min([new, *expected]) < 0
        return
    assert expected is not None and min([new, *expected]) >= 0 and float(expected[-1]).is_integer()
    assert math.isclose(pair.corrupted_answer, expected[-1]) and pair.clean_answer == problem.gold
    assert not math.isclose(expected[-1], problem.gold)
    assert pair.corrupted_question == problem.question.replace(f"holds {program.numbers[which]} ", f"holds {new:g} ")


# ---------------------------------------------------------------------- position resolution
@st.composite
def batches(draw) -> tuple[CODIPositions, list[int]]:
    """A left-padded batch laid out as a run lays it out: question lengths, thoughts, answer lengths."""
    lengths = draw(st.lists(st.integers(1, 12), min_size=1, max_size=5))
    n_latents = draw(st.integers(0, 8))
    answers = draw(st.lists(st.integers(1, 6), min_size=len(lengths), max_size=len(lengths)))
    width = max(lengths)
    positions = CODIPositions(
        n_pad=[width - n for n in lengths],
        bot=width,
        thoughts=[width + k for k in range(1, n_latents + 1)],
        eot=width + n_latents + 1,
        answer_start=width + n_latents + 2,
        answer_lengths=answers,
    )
    return positions, lengths


@settings(max_examples=300, deadline=None)
@given(batches(), st.data())
def test_named_positions_resolve_per_example_under_any_left_padding(batch, data):
    positions, lengths = batch
    width, n = max(lengths), positions.n_latents
    shortest, answer_positions = min(lengths), max(positions.answer_lengths) - 1
    k = data.draw(st.integers(0, n))
    j = data.draw(st.integers(0, shortest - 1))
    back = data.draw(st.integers(1, shortest))
    written = {  # the documented layout, per example
        "bot": [width] * len(lengths),
        f"thought:{k}": [width + k] * len(lengths),
        "eot": [width + n + 1] * len(lengths),
        f"question:{j}": [width - length + j for length in lengths],
        f"question:-{back}": [width - back] * len(lengths),
    }
    for name, expected in written.items():
        assert positions.resolve([name])[:, 0].tolist() == expected, name
    names = data.draw(st.lists(st.sampled_from(sorted(written)), min_size=1, max_size=5, unique=True))
    rows = [list(row) for row in zip(*(written[name] for name in names))]
    if any(len(set(row)) != len(row) for row in rows):  # two names on one position of some example
        with pytest.raises(PositionError, match="twice"):
            positions.resolve(names)
    else:
        assert positions.resolve(names).tolist() == rows
    if answer_positions > 0:
        a = data.draw(st.integers(0, answer_positions - 1))
        assert positions.resolve([f"answer:{a}"])[:, 0].tolist() == [width + n + 2 + a] * len(lengths)
    for outside in (
        f"thought:{n + 1}",
        f"question:{shortest}",
        f"question:-{shortest + 1}",
        f"answer:{max(answer_positions, 0)}",
    ):
        with pytest.raises(PositionError):
            positions.resolve([outside])


@settings(max_examples=300, deadline=None)
@given(batches(), st.data())
def test_a_chunk_finds_each_named_position_inside_it_or_says_minus_one(batch, data):
    positions, lengths = batch
    last = positions.answer_start + max(positions.answer_lengths) - 1
    start = data.draw(st.integers(0, last))
    size = data.draw(st.integers(1, last - start + 1))
    context = ChunkContext(torch.arange(start, start + size), positions)
    name = data.draw(st.sampled_from(["bot", "eot", *[f"thought:{k}" for k in range(1, positions.n_latents + 1)]]))
    where = positions.resolve([name])[:, 0]
    expected = [p - start if start <= p < start + size else -1 for p in where.tolist()]
    assert context.index_in_chunk(name).tolist() == expected


# ---------------------------------------------------------------------- stratified samples
def _problem(i: int, n_steps: int) -> Problem:
    solution = " ".join(f"<<{s}+1={s + 1}>>" for s in range(n_steps)) + f"\n#### {n_steps}"
    return problem_from_record({"question": f"q{i}", "answer": solution}, source="hand", split="test", index=i)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 7), min_size=0, max_size=60), st.integers(0, 12), st.integers(0, 2**16))
def test_stratified_sample_counts_per_bucket_without_duplicates_in_order(steps, n_per_bucket, seed):
    problems = [_problem(i, n) for i, n in enumerate(steps)]
    sample = stratified_sample(problems, n_per_bucket, seed=seed)
    ids = [p.id for p in sample]
    assert len(set(ids)) == len(ids)
    assert ids == [p.id for p in problems if p.id in set(ids)]  # the problems' own order
    for bucket in DIFFICULTY_BUCKETS:
        available = sum(difficulty_bucket(n) == bucket for n in steps)
        drawn = sum(difficulty_bucket(p.n_steps) == bucket for p in sample)
        assert drawn == min(n_per_bucket, available), bucket
    assert [p.id for p in stratified_sample(problems, n_per_bucket, seed=seed)] == ids  # deterministic


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.integers(1, 7), min_size=0, max_size=60),
    st.integers(0, 12),
    st.integers(0, 12),
    st.integers(0, 2**16),
)
def test_a_smaller_stratified_sample_is_a_subset_of_a_larger_one(steps, small, extra, seed):
    """Seeded the same way, N per bucket lies inside N + extra per bucket (the seeds' 100 inside their 1,000),
    and a bucket's draw does not depend on the other buckets' sizes."""
    problems = [_problem(i, n) for i, n in enumerate(steps)]
    smaller = {p.id for p in stratified_sample(problems, small, seed=seed)}
    larger = {p.id for p in stratified_sample(problems, small + extra, seed=seed)}
    assert smaller <= larger
    without_short = [p for p in problems if difficulty_bucket(p.n_steps) != "<=2"]
    long_ones = {p.id for p in stratified_sample(without_short, small, seed=seed)}
    assert long_ones == {p.id for p in problems if p.id in smaller and difficulty_bucket(p.n_steps) != "<=2"}


def test_stratified_sample_names_a_bucket_short_of_n():
    problems = [_problem(i, n) for i, n in enumerate([1, 1, 3, 4, 5, 6])]
    said = []
    sample = stratified_sample(problems, 2, seed=0, report=said.append)
    assert len(sample) == 6
    assert said == [
        "bucket 3 holds 1 problems, fewer than 2: taking all of them",
        "bucket 4 holds 1 problems, fewer than 2: taking all of them",
    ]
