"""The position map of a run, worked out by hand for a small left-padded batch (no model).

Batch of two: example 0 has a 5-token question after 2 pad tokens, example 1 a 7-token question; BOT at
7, thoughts 1..6 at 8..13, EOT at 14, answers from 15; example 0 generated 3 answer tokens and example 1
five, so answer positions 15..18 exist (the last token of each answer is never fed back).
"""

from __future__ import annotations

import pytest
import torch

from codi_lens.core.errors import PositionContextError, PositionError
from codi_lens.core.positions import ChunkContext, ChunkScope, CODIPositions, gather_at


@pytest.fixture
def run() -> CODIPositions:
    return CODIPositions(
        n_pad=[2, 0], bot=7, thoughts=list(range(8, 14)), eot=14, answer_start=15, answer_lengths=[3, 5]
    )


def test_named_positions_of_each_example(run):
    assert run.n_latents == 6 and run.n_answer_positions == 4
    thoughts = {f"thought_{k}": 7 + k for k in range(1, 7)}
    assert run.for_example(0) == {"question": [2, 3, 4, 5, 6], "bot": 7, **thoughts, "eot": 14, "answer": [15, 16]}
    assert run.for_example(1) == {
        "question": [0, 1, 2, 3, 4, 5, 6],
        "bot": 7,
        **thoughts,
        "eot": 14,
        "answer": [15, 16, 17, 18],
    }


def test_a_map_needs_one_answer_length_per_example():
    with pytest.raises(ValueError, match="one answer length per example: 2 examples, 1 answer lengths"):
        CODIPositions(n_pad=[0, 1], bot=3, thoughts=[4], eot=5, answer_start=6, answer_lengths=[2])


def test_describe_names_the_range_of_the_run(run):
    assert run.describe() == "bot 7, thoughts 1..6 at 8..13, eot 14, answer:0..3 at 15..18"
    empty = CODIPositions(n_pad=[0], bot=3, thoughts=[], eot=4, answer_start=5, answer_lengths=[1])
    assert empty.describe() == "bot 3, no thoughts, eot 4, no answer positions"
    assert empty.n_answer_positions == 0
    assert empty.for_example(0)["answer"] == []  # its only answer token was never fed back
    one = CODIPositions(n_pad=[0, 1], bot=3, thoughts=[4], eot=5, answer_start=6, answer_lengths=[2, 1])
    assert one.describe() == "bot 3, thoughts 1..1 at 4..4, eot 5, answer:0..0 at 6..6"
    assert one.for_example(0)["answer"] == [6] and one.for_example(1)["answer"] == []


def test_resolve_names_and_integers_per_example(run):
    table = run.resolve(["bot", "thought:1", "thought:6", "eot", "answer:0", "answer:3", 0, 1])
    assert table.tolist() == [[7, 8, 13, 14, 15, 18, 0, 1]] * 2
    assert run.resolve([18]).tolist() == [[18], [18]]
    assert run.resolve(["thought:0"]).tolist() == [[7], [7]]  # thought 0 is BOT
    assert run.resolve(["question:0", "question:-1"]).tolist() == [[2, 6], [0, 6]]
    assert run.resolve(["question:4", "question:-5"]).tolist() == [[6, 2], [4, 2]]
    assert run.resolve([]).shape == (2, 0) and run.resolve([]).dtype == torch.long


@pytest.mark.parametrize(
    ("positions", "message"),
    [
        (["thought:7"], r"^'thought:7' is outside this run: it has thoughts 1..6 \(bot 7, thoughts 1..6 at 8..13,"),
        (["thought:-1"], r"'thought:-1' is outside this run"),
        (["answer:4"], r"^'answer:4' is outside this run \(bot 7, .*answer:0..3 at 15..18\)$"),
        (["answer:-1"], r"'answer:-1' is outside this run"),
        (["question:5"], r"^'question:5' is outside the shortest question \(5 tokens\)$"),
        (["question:-6"], r"'question:-6' is outside the shortest question"),
        ([19], r"^position 19 is outside this run \(0..18; bot 7,"),
        ([-1], r"^position -1 is outside this run"),
        ([True], r"^a position is an int or a name like 'thought:3', not True$"),
        ([2.0], r"not 2.0$"),
        (["thoughts:1"], r"^unknown position name 'thoughts:1': use 'bot', 'thought:k', 'eot'"),
        (["bot:1"], r"unknown position name 'bot:1'"),
        (["thought:x"], r"unknown position name 'thought:x'"),
        (["thought"], r"unknown position name 'thought'"),
        (["bot", "thought:0"], r"^positions \['bot', 'thought:0'\] select the same position twice \(\[7, 7\]\)$"),
    ],
)
def test_positions_outside_the_run_are_refused_by_name(run, positions, message):
    with pytest.raises(PositionError, match=message):
        run.resolve(positions)


def test_a_bare_name_is_not_a_list_of_positions(run):
    with pytest.raises(TypeError, match=r"^positions must be a list, e.g. \['thought:3'\] or \[12\]$"):
        run.resolve("thought:3")
    with pytest.raises(TypeError):
        run.resolve(7)


def test_integer_positions_reach_eot_when_there_are_no_answers():
    run = CODIPositions(n_pad=[0], bot=3, thoughts=[4, 5], eot=6, answer_start=7, answer_lengths=[1])
    assert run.resolve([6]).tolist() == [[6]]
    with pytest.raises(PositionError, match=r"position 7 is outside this run \(0..6;"):
        run.resolve([7])


def test_chunk_context_finds_each_position_in_its_chunk(run):
    question = ChunkContext(span=torch.arange(0, 8), positions=run)
    assert question.start == 0
    assert question.index_in_chunk("question:0").tolist() == [2, 0]
    assert question.index_in_chunk("bot").tolist() == [7, 7]
    assert question.index_in_chunk("thought:1").tolist() == [-1, -1]
    thought_2 = ChunkContext(span=torch.tensor([9]), positions=run)
    assert thought_2.start == 9
    assert thought_2.index_in_chunk("thought:2").tolist() == [0, 0]
    assert thought_2.index_in_chunk("thought:1").tolist() == [-1, -1]
    assert thought_2.index_in_chunk("thought:3").tolist() == [-1, -1]
    assert thought_2.positions_of("blocks.0.hook_resid_post").tolist() == [9]
    assert thought_2.positions_of("blocks.0.attn.hook_rot_k").tolist() == list(range(10))  # every cached key


def test_chunk_scope_publishes_a_context_only_inside_its_block(run):
    scope = ChunkScope()
    assert not scope.active
    with pytest.raises(PositionContextError, match="a positional hook fired outside a CODI run"):
        _ = scope.current
    outer, inner = ChunkContext(torch.arange(8), run), ChunkContext(torch.tensor([8]), run)
    with scope.scoped(outer) as published:
        assert published is outer and scope.current is outer and scope.active
        with pytest.raises(RuntimeError), scope.scoped(inner):
            assert scope.current is inner
            raise RuntimeError("a hook failed")
        assert scope.current is outer  # restored after the inner chunk failed
    assert not scope.active


def test_gather_at_takes_each_examples_own_positions():
    acts = torch.arange(2 * 5 * 3).reshape(2, 5, 3)
    where = torch.tensor([[4, 0], [1, 1]])
    out = gather_at(acts, where)
    assert out.shape == (2, 2, 3)
    expected = torch.stack([torch.stack([acts[0, 4], acts[0, 0]]), torch.stack([acts[1, 1], acts[1, 1]])])
    assert torch.equal(out, expected)
