"""Problems generated from a published template, so an experiment can be rerun as its authors ran it.

``template:cywinski`` is the family of 3-step problems that Cywinski, Bussmann et al. (2025, "Can we interpret
latent reasoning using current mechanistic interpretability tools?") used to find where CODI-LLaMA keeps its two
intermediate values:

- ``step1 = X + Y`` or ``step1 = X - Y``;
- ``step2 = step1 * Z``;
- ``answer = step1 + step2``;

with ``X, Y, Z`` in ``1..8`` and ``X > Y``. Problems that share ``(step1, Z)`` share both intermediates
(:func:`grouping_key`): their mean latent is what the authors patched in. The stories are this project's own
wording (three of them); the arithmetic is theirs. Each problem is written in GSM8K format
(``<<X+Y=s1>> <<s1*Z=s2>> <<s1+s2=a>>`` then ``#### a``) with its intermediates recorded, so minimal pairs,
value-matched patching and the readouts run on it unchanged. The full set is every ``(X, Y, Z, operation)``
(448) in every story (1,344 problems), in a seeded order, so ``--limit N`` takes a mixed sample.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable

from codi_lens.data.problems import DataError, Problem

#: The operand range of the Cywinski templates (inclusive).
CYWINSKI_OPERANDS = range(1, 9)
#: Each story: (sentence with X, sentence with + Y, sentence with - Y, sentence with Z, question).
CYWINSKI_STORIES = (
    (
        "A club has {x} members.",
        "It gains {y} members.",
        "It loses {y} members.",
        "Then every member brings {z} new members.",
        "How many members does the club have now?",
    ),
    (
        "Nora has {x} marbles.",
        "She wins {y} more marbles.",
        "She gives away {y} marbles.",
        "Then, for each marble she has, she gets {z} more.",
        "How many marbles does Nora have in the end?",
    ),
    (
        "A shelf holds {x} books.",
        "Someone adds {y} books to it.",
        "Someone takes {y} books from it.",
        "Next, {z} new books arrive for every book on the shelf.",
        "How many books are on the shelf now?",
    ),
)
SEED = 0


def cywinski_arithmetic(x: int, y: int, z: int, op: str) -> tuple[int, int, int]:
    """``(step1, step2, answer)`` of one Cywinski problem: ``x op y``, times ``z``, then their sum."""
    step1 = x + y if op == "+" else x - y
    step2 = step1 * z
    return step1, step2, step1 + step2


def grouping_key(problem: Problem) -> tuple[float, float]:
    """``(step1, Z)``: problems with the same key share both intermediate values (``step2 = step1 * Z``)."""
    step1, step2 = problem.intermediates[0], problem.intermediates[1]
    return step1, step2 / step1


def shared_with_step(problem: Problem, step: int) -> float | None:
    """What problems must share with ``problem``, besides their value at ``step``, for their mean latent to be a
    :func:`grouping_key` group: ``Z`` at step 1 and ``step1`` at step 2 (so another value at step 1 keeps ``Z``,
    and another at step 2 keeps ``step1``); a value-patching context (``codi_lens.value_patching.Context``)."""
    step1, z = grouping_key(problem)
    return {1: z, 2: step1}.get(step)


def cywinski_problems() -> list[Problem]:
    """Every Cywinski problem (see the module docstring), in a seeded order; ids ``template:cywinski:<i>``."""
    rows = []
    for story, x, y, z, op in itertools.product(
        range(len(CYWINSKI_STORIES)), CYWINSKI_OPERANDS, CYWINSKI_OPERANDS, CYWINSKI_OPERANDS, "+-"
    ):
        if x > y:
            rows.append((story, x, y, z, op))
    random.Random(SEED).shuffle(rows)
    return [_cywinski_problem(i, *row) for i, row in enumerate(rows)]


def _cywinski_problem(index: int, story: int, x: int, y: int, z: int, op: str) -> Problem:
    start, gain, loss, times, question = CYWINSKI_STORIES[story]
    step1, step2, answer = cywinski_arithmetic(x, y, z, op)
    text = " ".join([start, gain if op == "+" else loss, times, question]).format(x=x, y=y, z=z)
    solution = f"<<{x}{op}{y}={step1}>> <<{step1}*{z}={step2}>> <<{step1}+{step2}={answer}>>\n#### {answer}"
    return Problem(
        id=f"template:cywinski:{index}",
        question=text,
        solution=solution,
        gold=float(answer),
        n_steps=3,
        source="template:cywinski",
        split="all",
        index=index,
        intermediates=(float(step1), float(step2), float(answer)),
    )


#: The template families by name (``--data template:<name>``).
TEMPLATES: dict[str, Callable[[], list[Problem]]] = {"cywinski": cywinski_problems}


def template_problems(source: str) -> list[Problem]:
    """The problems of ``template:<name>`` (raises :class:`DataError` naming the known templates)."""
    name = source.split(":", 1)[1]
    if name not in TEMPLATES:
        raise DataError(f"--data {source}: no template {name!r}; templates: {', '.join(sorted(TEMPLATES))}")
    return TEMPLATES[name]()
