"""``template:cywinski`` is the problem family of Cywinski, Bussmann et al. (2025), checked against their definition
written out here, and a substituted intermediate is carried through the rest of a chain as the arithmetic says."""

from __future__ import annotations

import itertools
import re

import pytest

from codi_lens.data import DataError, load_problems
from codi_lens.data.pairs import Rejected, parse_chain, recompute_from_step
from codi_lens.data.templates import grouping_key
from codi_lens.value_patching import answer_with_value


def test_the_cywinski_problems_are_every_case_of_their_definition_once_per_story():
    problems = load_problems("template:cywinski")
    # step1 = X +/- Y, step2 = step1 * Z, answer = step1 + step2; X, Y, Z in 1..8; X > Y
    expected = {
        (x, y, z, x + y if op == "+" else x - y)
        for x, y, z, op in itertools.product(range(1, 9), range(1, 9), range(1, 9), "+-")
        if x > y
    }
    seen = []
    for p in problems:
        x, y, z = (int(n) for n in re.findall(r"\d+", p.question))
        step1 = int(p.intermediates[0])
        assert p.intermediates == (step1, step1 * z, step1 + step1 * z)
        assert p.gold == step1 + step1 * z and p.n_steps == 3
        assert [s.result for s in parse_chain(p.solution)] == list(p.intermediates)
        assert grouping_key(p) == (step1, z)
        seen.append((x, y, z, step1))
    assert set(seen) == expected and len(expected) == 448
    assert len(seen) == 3 * len(expected)  # three stories, each case once in each
    assert len({p.id for p in problems}) == len(problems)


def test_a_limit_takes_a_mixed_sample_and_an_unknown_template_is_named():
    first = load_problems("template:cywinski", limit=40)
    assert len(first) == 40 and len({p.intermediates[0] for p in first}) > 5
    assert {"+" in p.solution.split()[0] for p in first} == {True, False}
    with pytest.raises(DataError, match="no template 'nope'.*cywinski"):
        load_problems("template:nope")


def test_a_substituted_intermediate_is_traced_through_the_chain_by_hand():
    spans = parse_chain("<<7+4=11>> <<11*2=22>> <<11+22=33>>")
    assert recompute_from_step(spans, 1, 5, [7, 4, 2]) == 5 + 5 * 2
    assert recompute_from_step(spans, 2, 30, [7, 4, 2]) == 11 + 30
    assert recompute_from_step(spans, 3, 8, [7, 4, 2]) == 8
    # 3 is both step 1's result and the question's Z: which one the 3 of "3*3" is cannot be told
    with pytest.raises(Rejected):
        recompute_from_step(parse_chain("<<5-2=3>> <<3*3=9>> <<3+9=12>>"), 1, 4, [5, 2, 3])
    with pytest.raises(Rejected):  # the answer does not depend on step 1
        recompute_from_step(parse_chain("<<16+6=22>> <<5*2=10>>"), 1, 3, [16, 6, 5, 2])


def test_value_patching_predicts_the_answer_of_the_changed_intermediate():
    problem = next(p for p in load_problems("template:cywinski") if p.solution.startswith("<<8+2=10>> <<10*5"))
    assert answer_with_value(problem, 1, 4.0) == 4 + 4 * 5
    assert answer_with_value(problem, 2, 7.0) == 10 + 7
    toy = next(p for p in load_problems("toy-chain:test") if "//" in p.solution or "/" in p.solution)
    values = list(toy.intermediates)
    assert answer_with_value(toy, len(values), 9.0) == 9.0  # the last step is the answer itself


def test_template_value_means_average_problems_that_share_step1_and_z():
    """With ``shared_with_step``, every mean that value patching feeds is over problems of one (step1, Z) group,
    worked out here from the problems' own numbers; ``different`` keeps Z at step 1 and step1 at step 2."""
    import torch

    from codi_lens.data.templates import shared_with_step
    from codi_lens.value_patching import ValueMeans, substitutions

    problems = load_problems("template:cywinski")
    embeds = torch.arange(len(problems), dtype=torch.float32)[:, None, None].expand(-1, 6, 4)  # row i holds i
    means = ValueMeans.from_reference(problems, embeds, shared_with_step)
    groups: dict[tuple[float, float], list[int]] = {}
    z_of = [int(re.findall(r"\d+", p.question)[2]) for p in problems]
    for i, p in enumerate(problems):
        groups.setdefault((p.intermediates[0], z_of[i]), []).append(i)
    evaluated = problems[:40]
    for step in (1, 2):
        for condition in ("same", "different"):
            chosen = substitutions(evaluated, means, step, condition, min_count=3)
            assert len(chosen) > 20, (step, condition)
            for row, value, mean, n in chosen:
                step1, z = evaluated[row].intermediates[0], z_of[row]
                # step 1: another step1 with the same Z; step 2: another step2 (so another Z) with the same step1
                key = (value, z) if step == 1 else (step1, value / step1)
                assert n == len(groups[key]) and float(mean[0, 0]) == pytest.approx(sum(groups[key]) / n), key
                assert (value == evaluated[row].intermediates[step - 1]) == (condition == "same")
