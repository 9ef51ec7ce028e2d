"""Position context, named positions and run-range checks: the ways a hook used to miss silently.

Each test here failed on the code before the hardening issue: the hook fired on the wrong position,
never fired, or an intervention on a thought the run does not reach passed without a word.
"""

from __future__ import annotations

import pytest
import torch

from codi_lens import (
    PositionContextError,
    PositionError,
    load_codi,
    load_pretrained,
    positional_hook,
    replace_at_positions,
    thought_hook_name,
    zero_at_positions,
)
from codi_lens.interventions import zero_thoughts

#: Two toy questions of equal token length that differ in one number (the start value).
CLEAN = "Ava has 16 coins. On Monday Ava buys 3 more. On Tuesday Ava keeps half of them. How many now?"
CORRUPTED = CLEAN.replace("16", "18")
LONGER = "Ben has 7 cards. On Monday Ben loses 2. On Tuesday Ben buys 9 more. On Wednesday Ben sells 4. How many now?"


@pytest.fixture(scope="module")
def toy():
    return load_pretrained("toy-arith")


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    ckpt = tiny_checkpoint("llama")
    return load_codi(ckpt.checkpoint_dir, ckpt.base_dir)


def _add(vector):
    return lambda acts, hook, which: acts + vector.to(acts.dtype)


def test_positional_hook_outside_a_codi_run_raises_instead_of_never_firing(tiny, questions):
    """After ``score_answers`` the old code left stale positions, so a plain ``run_with_hooks`` with a
    positional hook silently did nothing. Now it says why it cannot place itself."""
    tiny.score_answers(questions[:1], ["The answer is: 3"])
    hook = zero_at_positions(tiny, [0])
    tokens, _ = tiny.tokenize_questions(questions[:1])
    with pytest.raises(PositionContextError, match="outside a CODI run"):
        tiny.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_resid_post", hook)])


def test_unembed_hook_sees_only_the_positions_it_unembeds(toy):
    """``unembed.hook_out`` covers only the last position of a chunk. A hook at position 0 (a question
    token) must not fire on BOT's logits (it did: any length mismatch was read as "position 0..n")."""
    plain = toy.run_codi([CLEAN], max_new_tokens=8, return_logits=True)
    at_zero = toy.run_codi(
        [CLEAN],
        max_new_tokens=8,
        return_logits=True,
        fwd_hooks=[("unembed.hook_out", positional_hook(toy, [0], lambda a, h, w: a + 100.0))],
    )
    assert torch.equal(at_zero.step_logits, plain.step_logits)
    # Aimed at EOT, the hook changes exactly the logits that predict the first answer token.
    token = toy.tokenizer.convert_tokens_to_ids("Monday")
    boost = torch.zeros(toy.cfg.d_vocab)
    boost[token] = 1e4
    at_eot = toy.run_codi(
        [CLEAN],
        max_new_tokens=8,
        return_logits=True,
        fwd_hooks=[("unembed.hook_out", positional_hook(toy, ["eot"], _add(boost)))],
    )
    assert torch.equal(at_eot.step_logits[:, :7], plain.step_logits[:, :7])  # BOT + 6 thoughts
    assert at_eot.answer_tokens[0][0] == token != plain.answer_tokens[0][0]


def test_a_codi_run_nested_in_a_hook_leaves_the_outer_run_intact(tiny, questions):
    """A hook that runs the model itself (mid-chunk) used to overwrite the outer run's positions."""
    push = torch.randn(tiny.cfg.d_model, generator=torch.Generator().manual_seed(1))
    target = positional_hook(tiny, ["thought:3"], _add(push))
    expected = tiny.run_codi(questions[:2], max_new_tokens=3, fwd_hooks=[("blocks.1.hook_resid_post", target)])
    depth = []

    def nested(acts, hook):
        if not depth:  # the inner run fires this hook too; nest once
            depth.append(1)
            tiny.run_codi([questions[2]], max_new_tokens=2)
            depth.pop()
        return acts

    got = tiny.run_codi(
        questions[:2],
        max_new_tokens=3,
        fwd_hooks=[("blocks.0.hook_resid_post", nested), ("blocks.1.hook_resid_post", target)],
    )
    assert torch.equal(got.latent_states, expected.latent_states)
    assert got.answer_tokens == expected.answer_tokens


def test_named_positions_follow_each_batch_padding(tiny, questions):
    """``thought:3`` and ``question:0`` land on the same token whatever the batch pads to: an example
    edited inside a wider batch equals the same edit on the example alone."""
    push = torch.randn(tiny.cfg.d_model, generator=torch.Generator().manual_seed(2))
    for where in (["thought:3"], ["question:0"], ["question:-1", "eot"], ["bot"]):
        hooks = [("blocks.0.hook_resid_post", positional_hook(tiny, where, _add(push)))]
        batch = tiny.run_codi(questions, max_new_tokens=3, fwd_hooks=hooks)
        plain = tiny.run_codi(questions, max_new_tokens=3)
        assert not torch.allclose(batch.latent_states, plain.latent_states, atol=1e-4)
        for i, question in enumerate(questions):
            alone = tiny.run_codi([question], max_new_tokens=3, fwd_hooks=hooks)
            assert (batch.latent_states[i] - alone.latent_states[0]).abs().max() <= 1e-5, where
            assert batch.answer_tokens[i] == alone.answer_tokens[0]
    # question:0 is each example's own first token, not one shared absolute position.
    layout = tiny.run_codi(questions, max_new_tokens=2).positions
    resolved = layout.resolve(["question:0", "thought:3", "answer:0"])
    assert resolved[:, 0].tolist() == layout.n_pad
    assert resolved[:, 1].tolist() == [layout.thoughts[2]] * 3 and resolved[:, 2].tolist() == [layout.answer_start] * 3


def test_named_thought_position_is_the_thought_fed_there(tiny, questions):
    """One position off would edit h_{k-1} or h_{k+1}: zeroing the layer input at ``thought:k``
    (``hook_embed``) must equal feeding a zero thought k."""
    for k in (1, 4, 6):
        by_name = tiny.run_codi(
            questions, max_new_tokens=3, fwd_hooks=[("hook_embed", zero_at_positions(tiny, [f"thought:{k}"]))]
        )
        by_thought = tiny.run_codi(questions, max_new_tokens=3, fwd_hooks=zero_thoughts([k]))
        assert (by_name.latent_states - by_thought.latent_states).abs().max() <= 1e-6
        assert torch.equal(
            by_name.latent_states[:, :k], tiny.run_codi(questions, max_new_tokens=1).latent_states[:, :k]
        )


def test_replace_at_positions_keeps_the_callers_order_and_refuses_duplicates(tiny, questions):
    values = torch.randn(2, 2, tiny.cfg.d_model, generator=torch.Generator().manual_seed(3))
    _, cache = tiny.run_codi_with_cache(
        questions[:2],
        max_new_tokens=2,
        names_filter="blocks.0.hook_resid_post",
        fwd_hooks=[("blocks.0.hook_resid_post", replace_at_positions(tiny, ["thought:4", "thought:2"], values))],
    )
    layout = tiny.run_codi(questions[:2], max_new_tokens=2).positions
    acts = cache["blocks.0.hook_resid_post"]
    assert torch.equal(acts[:, layout.thoughts[3]], values[:, 0])  # thought 4 got values[:, 0]
    assert torch.equal(acts[:, layout.thoughts[1]], values[:, 1])
    with pytest.raises(PositionError, match="twice"):
        replace_at_positions(tiny, ["thought:2", "thought:2"], values)
    with pytest.raises(PositionError, match="same position twice"):
        tiny.run_codi(
            questions[:2],
            max_new_tokens=2,
            fwd_hooks=[("blocks.0.hook_resid_post", replace_at_positions(tiny, ["bot", layout.bot], values))],
        )


def test_interventions_outside_the_run_raise_naming_its_range(tiny, questions):
    tiny.run_codi(questions[:1], n_latents=8, max_new_tokens=1)  # creates hook points for thoughts 7 and 8
    with pytest.raises(PositionError, match=r"it has 6 thoughts"):
        tiny.run_codi(questions[:1], max_new_tokens=2, fwd_hooks=zero_thoughts([7]))
    with pytest.raises(PositionError, match=r"it has 6 thoughts"):
        tiny.score_answers(questions[:1], ["The answer is: 1"], fwd_hooks=zero_thoughts([7]))
    for position, match in (
        ("thought:7", r"thoughts 1\.\.6"),
        ("answer:3", "outside this run"),  # a 4-token budget feeds answer tokens 0..2
        (10_000, "outside this run"),
        ("thougt:2", "unknown position name"),
    ):
        with pytest.raises(PositionError, match=match):
            _zero_resid_at(tiny, questions[:1], position)
    with pytest.raises(KeyError, match="blocks.0.hook_resid_pots"):
        tiny.run_codi(questions[:1], max_new_tokens=2, fwd_hooks=[("blocks.0.hook_resid_pots", lambda a, h: a)])
    _zero_resid_at(tiny, questions[:1], "answer:2")  # the last reachable answer position works


def _zero_resid_at(model, questions, position):
    hook = zero_at_positions(model, [position])
    return model.run_codi(questions, max_new_tokens=4, fwd_hooks=[("blocks.0.hook_resid_post", hook)])


def test_degenerate_calls_give_clear_errors_or_correct_results(tiny, questions):
    with pytest.raises(ValueError, match="questions is empty"):
        tiny.run_codi([])
    with pytest.raises(ValueError, match="questions is empty"):
        tiny.score_answers([], [])
    with pytest.raises(TypeError, match="single string"):
        tiny.run_codi(questions[0])
    with pytest.raises(ValueError, match="n_latents"):
        tiny.run_codi(questions[:1], n_latents=-1)
    # No thoughts: BOT, then EOT. Teacher forcing must give the generation's own logits.
    generated = tiny.run_codi(questions, n_latents=0, max_new_tokens=4, return_logits=True)
    scores = tiny.score_answers(questions, generated.answer_tokens, n_latents=0)
    assert scores.thought_embeds.shape == (3, 0, tiny.cfg.d_model) and scores.latent_states.shape[1] == 1
    for i, tokens in enumerate(generated.answer_tokens):
        rows = generated.step_logits[i, 1 : 1 + len(tokens)]
        assert (scores.logits[i, : len(tokens)] - rows).abs().max() <= 1e-5


def test_patching_every_position_of_a_layer_reproduces_the_clean_run(toy):
    """The canonical patching sanity check, inside the loop: write the clean run's residual at every
    position of one layer into the corrupted run; everything downstream is then the clean run's."""
    budget = 12
    clean, cache = toy.run_codi_with_cache(
        [CLEAN], max_new_tokens=budget, names_filter=lambda n: n.endswith("hook_resid_post")
    )
    corrupted = toy.run_codi([CORRUPTED], max_new_tokens=budget)
    assert clean.prediction != corrupted.prediction and clean.positions.bot == corrupted.positions.bot
    for layer in range(toy.cfg.n_layers):
        acts = cache[f"blocks.{layer}.hook_resid_post"]
        hook = replace_at_positions(toy, list(range(acts.shape[1])), acts)
        patched = toy.run_codi(
            [CORRUPTED], max_new_tokens=budget, fwd_hooks=[(f"blocks.{layer}.hook_resid_post", hook)]
        )
        assert torch.equal(patched.latent_states, clean.latent_states), layer
        assert patched.answer_tokens == clean.answer_tokens
    # Patching nothing reproduces the corrupted run.
    none = replace_at_positions(toy, [], cache["blocks.0.hook_resid_post"][:, :0])
    again = toy.run_codi([CORRUPTED], max_new_tokens=budget, fwd_hooks=[("blocks.0.hook_resid_post", none)])
    assert torch.equal(again.latent_states, corrupted.latent_states)


def test_cached_rotated_keys_hold_each_position_once(toy):
    """``hook_rot_k`` covers every cached position at each chunk; the cache keeps each position once,
    equal to the keys rotated in one full pass."""
    result, cache = toy.run_codi_with_cache([CLEAN, LONGER], max_new_tokens=5)
    length = result.positions.answer_start + max(result.positions.answer_lengths) - 1
    rot_k = cache["blocks.1.attn.hook_rot_k"]
    assert rot_k.shape[1] == length == cache["blocks.1.hook_resid_pre"].shape[1]
    # Reference: HF's own rotary embedding (the shipped model's config: default RoPE, theta 1e4) applied to the
    # unrotated keys, each example's positions counted from its first real token (left padding has none).
    from transformers import AutoConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    from codi_lens.loading import PRETRAINED

    rotary = LlamaRotaryEmbedding(AutoConfig.from_pretrained(PRETRAINED["toy-arith"]))
    k = cache["blocks.1.attn.hook_k"]  # [batch, pos, kv_head, d_head]
    for i, pad in enumerate(result.positions.n_pad):
        keys = k[i : i + 1, pad:].transpose(1, 2)  # [1, kv_head, pos, d_head]
        cos, sin = rotary(keys, torch.arange(length - pad)[None])
        expected, _ = apply_rotary_pos_emb(keys, keys, cos, sin)
        assert (rot_k[i, pad:] - expected[0].transpose(0, 1)).abs().max() <= 1e-5
    assert cache[thought_hook_name(0, "hidden")].shape == (2, toy.cfg.d_model)
