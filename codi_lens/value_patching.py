"""Value-matched patching: replace a thought by the mean thought of problems that share (or do not
share) one intermediate value, and see whether the answer stays or moves where the value predicts.

For a problem, a thought k and a step j of its chain, the fed thought ``z_k`` is replaced by the mean
``z_k`` of reference problems (never the evaluated ones) whose intermediate j equals:

- ``same``: this problem's own value at step j: if thought k carries step j's value and little else,
  the answer stays right;
- ``different``: another value v (seeded choice among values with enough reference problems): if it
  carries it, the answer moves to the chain recomputed from v (:func:`answer_with_value`), the
  ``predicted_answer``; ``moved`` says whether it did;
- ``any_value`` (control): the mean ``z_k`` of every reference problem with at least j steps, which
  keeps the thought's typical form but no particular value.

A ``context`` (:data:`Context`) narrows the groups: with ``codi_lens.data.templates.shared_with_step`` every
mean is over problems that share both intermediates of a Cywinski template, as its authors grouped them.

Chains are recomputed only where every calculator span reads ``a op b = c`` with ``a`` the previous
result (the synthetic problems, and some GSM8K ones); elsewhere ``predicted_answer`` is NaN.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from codi_lens.core.branching import Branch, grow_trunk, run_branches
from codi_lens.core.model import CODIModel
from codi_lens.data.pairs import Rejected, parse_chain, question_numbers, recompute_from_step
from codi_lens.data.problems import CALC_SPAN, Problem
from codi_lens.data.synthetic import is_synthetic
from codi_lens.interventions.thoughts import replace_thoughts
from codi_lens.run.store import UNIT_COLUMN

CONDITIONS = ("same", "different", "any_value")
_SPAN = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s*(//|[+\-*/])\s*(-?\d+(?:\.\d+)?)\s*=\s*(-?\d+(?:\.\d+)?)\s*$")
_APPLY = {
    "+": lambda a, b: a + b,
    "-": lambda a, b: a - b,
    "*": lambda a, b: a * b,
    "/": lambda a, b: a / b,
    "//": lambda a, b: a // b,
}


def chain_steps(problem: Problem) -> list[tuple[str, float]] | None:
    """``[(op, operand), ...]`` for each span after the first if the solution is a running chain
    (each span ``a op b = c`` starts from the previous result), else None."""
    spans = [_SPAN.match(s) for s in CALC_SPAN.findall(problem.solution)]
    if not spans or any(m is None for m in spans):
        return None
    steps, previous = [], None
    for m in spans:
        a, op, b, c = float(m[1]), m[2], float(m[3]), float(m[4])
        if previous is not None and a != previous:
            return None
        steps.append((op, b))
        previous = c
    return steps


def answer_with_value(problem: Problem, step: int, value: float) -> float | None:
    """The final answer of ``problem``'s chain with intermediate ``step`` (1-based) set to ``value`` and every
    later step recomputed from it; None if the chain cannot be recomputed. A synthetic problem's chain is a
    program (each step applied to the previous result: :func:`chain_steps`); any other chain is recomputed by
    tracing which operands are earlier results (:func:`~codi_lens.data.pairs.recompute_from_step`:
    ``<<s1*Z=s2>> <<s1+s2=a>>`` gives ``value + value * Z``), refusing an operand that could also be a number of
    the question."""
    if not is_synthetic(problem):
        try:
            spans = parse_chain(problem.solution)
            numbers = [number for _, _, number in question_numbers(problem.question)]
            return recompute_from_step(spans, step, value, numbers)
        except Rejected:
            return None
    steps = chain_steps(problem)
    if steps is None or not 1 <= step <= len(steps):
        return None
    result = float(value)
    for op, operand in steps[step:]:
        if op in ("/", "//") and operand == 0:
            return None
        result = float(_APPLY[op](result, operand))
    return result


#: What reference problems must share with a problem, besides its value at a step, to be averaged with it:
#: ``context(problem, step)``, compared by equality (None: nothing more).
Context = Callable[[Problem, int], Hashable]


def no_context(problem: Problem, step: int) -> None:
    """Reference problems share only the value at the step."""
    return None


@dataclass
class ValueMeans:
    """Mean fed thoughts of reference problems grouped by (step, value of that step, context).

    Attributes:
        by_value: ``(step, value, context) -> ([n_latents, d_model] mean, number of problems)``.
        by_step: ``step -> ([n_latents, d_model] mean over problems with >= step steps, count)``.
        context: what a group shares besides the value (:data:`Context`); the ``different`` condition
            draws another value among the groups that share this problem's context.
    """

    by_value: dict[tuple[int, float, Hashable], tuple[Tensor, int]]
    by_step: dict[int, tuple[Tensor, int]]
    context: Context = no_context

    @classmethod
    def from_reference(
        cls,
        problems: Sequence[Problem],
        thought_embeds: Float[Tensor, "problem n_latents d_model"],
        context: Context = no_context,
    ) -> ValueMeans:
        """Group reference problems' fed thoughts (e.g. ``ThoughtStates.thought_embeds``)."""
        members: dict[tuple[int, float, Hashable], list[int]] = {}
        steps: dict[int, list[int]] = {}
        for i, p in enumerate(problems):
            for j, v in enumerate(p.intermediates, start=1):
                members.setdefault((j, float(v), context(p, j)), []).append(i)
                steps.setdefault(j, []).append(i)
        mean = lambda rows: (thought_embeds[rows].float().mean(0), len(rows))
        return cls(
            {key: mean(rows) for key, rows in members.items()},
            {j: mean(rows) for j, rows in steps.items()},
            context,
        )

    def values_at(self, step: int, min_count: int, context: Hashable = None) -> list[float]:
        """The values at ``step`` of the groups with ``context`` and at least ``min_count`` problems."""
        return sorted(v for (j, v, c), (_, n) in self.by_value.items() if j == step and c == context and n >= min_count)


def _choose_other(problem_id: str, step: int, own: float, candidates: list[float], seed: int) -> float | None:
    others = [v for v in candidates if v != own]
    if not others:
        return None
    rng = np.random.default_rng(zlib.crc32(f"{seed}:{problem_id}:{step}".encode()))
    return others[int(rng.integers(len(others)))]


def substitutions(
    problems: Sequence[Problem], means: ValueMeans, step: int, condition: str, *, min_count: int = 3, seed: int = 0
) -> list[tuple[int, float | None, Tensor, int]]:
    """For each problem with at least ``step`` steps that the condition applies to:
    ``(row, substituted value or None, [n_latents, d_model] mean, n reference problems)``."""
    if condition not in CONDITIONS:
        raise ValueError(f"condition must be one of {CONDITIONS}, got {condition!r}")
    out = []
    candidates_in: dict[Hashable, list[float]] = {}  # the values with enough reference problems, per context
    for row, p in enumerate(problems):
        if p.n_steps < step or len(p.intermediates) < step:
            continue
        own = float(p.intermediates[step - 1])
        if condition == "any_value":
            if step in means.by_step:
                out.append((row, None, *means.by_step[step]))
            continue
        context = means.context(p, step)
        if context not in candidates_in:
            candidates_in[context] = means.values_at(step, min_count, context)
        candidates = candidates_in[context]
        value = own if condition == "same" else _choose_other(p.id, step, own, candidates, seed)
        if value is None or value not in candidates:
            continue
        out.append((row, value, *means.by_value[(step, value, context)]))
    return out


def value_patching_rows(
    model: CODIModel,
    problems: Sequence[Problem],
    means: ValueMeans,
    *,
    thoughts: Sequence[int] | None = None,
    conditions: Sequence[str] = CONDITIONS,
    n_latents: int = 6,
    max_new_tokens: int = 256,
    min_count: int = 3,
    seed: int = 0,
    max_rows: int = 64,
) -> pd.DataFrame:
    """Every (problem, thought k, step j, condition): one generation with ``z_k`` replaced (see the
    module docstring). The problems' unpatched run is computed once; each generation branches off it at
    thought k (:mod:`codi_lens.core.branching`), the generations of every (step, condition) side by side,
    ``max_rows`` at a time.
    Columns: ``problem_id, n_steps, thought, step, condition, own_value, value`` (substituted; NaN for
    ``any_value``), ``n_reference``, ``predicted_answer`` (the chain recomputed from ``value``),
    ``prediction``, ``correct`` (equals the gold answer), ``moved`` (equals ``predicted_answer``, for
    ``different`` only)."""
    thoughts = list(range(1, n_latents + 1) if thoughts is None else thoughts)
    max_steps = max((p.n_steps for p in problems), default=0)
    configurations = {
        (step, condition): chosen
        for step in range(1, max_steps + 1)
        for condition in conditions
        if (chosen := substitutions(problems, means, step, condition, min_count=min_count, seed=seed))
    }
    # Every configuration's generations side by side (a problem once per configuration it is in).
    generations = [
        _Generation(step, condition, row, value, mean, n_ref)
        for (step, condition), chosen in configurations.items()
        for row, value, mean, n_ref in chosen
    ]
    predictions: dict[int, list[float | None]] = {k: [] for k in thoughts}
    trunk = grow_trunk(model, [p.question for p in problems], n_latents=n_latents) if generations else None
    for start in range(0, len(generations), max_rows):
        block = generations[start : start + max_rows]
        branches = [Branch(replace_thoughts({k: torch.stack([g.mean[k - 1] for g in block])}), k) for k in thoughts]
        outputs = run_branches(model, trunk.rows([g.row for g in block]), branches, max_new_tokens=max_new_tokens)
        for k, output in zip(thoughts, outputs):
            predictions[k].extend(model.decode_answers(output.answer_tokens)[1])
    return pd.DataFrame(
        [
            _row(problems[g.row], k, g, prediction)
            for k in thoughts
            for g, prediction in zip(generations, predictions[k], strict=True)
        ]
    )


class _Generation(NamedTuple):
    """One (step, condition) generation of problem ``row``: the value substituted, the mean thoughts fed and
    the reference problems they average."""

    step: int
    condition: str
    row: int
    value: float | None
    mean: Float[Tensor, "n_latents d_model"]
    n_ref: int


def _row(p: Problem, k: int, g: _Generation, prediction: float | None) -> dict:
    step, condition, value = g.step, g.condition, g.value
    predicted = answer_with_value(p, step, value) if condition == "different" else None
    moved = predicted is not None and prediction is not None and float(prediction) == predicted
    return {
        UNIT_COLUMN: p.id,
        "problem_id": p.id,
        "n_steps": p.n_steps,
        "thought": k,
        "step": step,
        "condition": condition,
        "own_value": float(p.intermediates[step - 1]),
        "value": np.nan if value is None else value,
        "n_reference": g.n_ref,
        "predicted_answer": np.nan if predicted is None else predicted,
        "prediction": np.nan if prediction is None else float(prediction),
        "correct": prediction is not None and float(prediction) == float(p.gold),
        "moved": float(moved) if condition == "different" else np.nan,
    }
