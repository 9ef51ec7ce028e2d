"""The block that normalises its residual once for the attention's query, key and value inputs, against
TransformerLens' own block (three ``ln1`` calls), hook point by hook point, and the switch between them.

TransformerLens' block is taken by hooking ``ln1.hook_normalized`` with a hook that changes nothing. The two are
compared on the tiny LLaMA (RMSNorm) and GPT-2 (LayerNorm) checkpoints on questions of different lengths in one
batch, through the thoughts and decoding. The whole loop against HF + peft is ``test_parity.py``'s (it runs the
shared path).
"""

from __future__ import annotations

import pytest
import torch
from embedding_gradients import embedding_gradient

from codi_lens import load_codi
from codi_lens.core.fused_attention import EXPLICIT_ONLY_HOOKS
from codi_lens.core.shared_norm import SharedNormBlock


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def model(request, tiny_checkpoint):
    ckpt = tiny_checkpoint(request.param, "safetensors" if request.param == "llama" else "bin")
    return load_codi(ckpt.checkpoint_dir, ckpt.base_dir)


def _block_points(model) -> list[str]:
    """Every hook point of every block but ``ln1``'s (a hook there selects TransformerLens' block) and the
    attention pattern's (a hook there selects the explicit attention)."""
    return [
        name
        for name in model.hook_dict
        if name.startswith("blocks.") and ".ln1." not in name and not name.endswith(EXPLICIT_ONLY_HOOKS)
    ]


def _unchanged_ln1(model) -> list[tuple[str, object]]:
    """A hook that changes nothing on every block's ``ln1``: every block takes TransformerLens' own forward."""
    return [(f"blocks.{layer}.ln1.hook_normalized", lambda x, hook: x) for layer in range(model.cfg.n_layers)]


def test_the_blocks_take_the_shared_norm_class(model):
    assert all(type(block) is SharedNormBlock for block in model.blocks)


def test_every_block_hook_sees_the_same_values_bit_for_bit_on_both_paths(model, questions):
    """Questions of different lengths in one batch, six thoughts and decoded answers: every hook point of every
    block (but ``ln1``'s) fires on both paths with equal values, bit for bit, and so do the latent states and
    each step's logits."""
    points = _block_points(model)
    shared, shared_cache = model.run_codi_with_cache(
        questions, names_filter=points, max_new_tokens=6, return_logits=True
    )
    own, own_cache = model.run_codi_with_cache(
        questions, names_filter=points, max_new_tokens=6, return_logits=True, fwd_hooks=_unchanged_ln1(model)
    )
    assert shared.answer_tokens == own.answer_tokens
    assert set(shared_cache.keys()) == set(own_cache.keys())
    assert {f"blocks.0.{p}" for p in ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "attn.hook_q")} <= set(
        shared_cache.keys()
    )
    for name in sorted(shared_cache.keys()):
        assert torch.equal(shared_cache[name], own_cache[name]), name
    assert torch.equal(shared.latent_states, own.latent_states)
    assert torch.equal(shared.step_logits, own.step_logits)


def test_ln1_runs_once_per_block_and_chunk_until_a_hook_is_on_it(model):
    """Unhooked, ``ln1`` runs once per block and chunk; a hook on ``ln1.hook_scale`` sends that block, and only
    it, to TransformerLens' forward, where ``ln1`` runs three times and the hook sees all three calls; removing
    the hook brings the single call back."""
    question = ["Uma owns 8 cards. How many cards does Uma own?"]
    calls: dict[int, int] = {}
    handles = [
        block.ln1.register_forward_hook(lambda module, args, out, layer=layer: calls.update({layer: calls[layer] + 1}))
        for layer, block in enumerate(model.blocks)
    ]
    seen = []
    try:
        calls.update(dict.fromkeys(range(model.cfg.n_layers), 0))
        model.run_codi(question, n_latents=2, max_new_tokens=1)
        chunks = calls[0]
        assert chunks >= 3 and set(calls.values()) == {chunks}  # question, two thoughts, at least one token
        calls.update(dict.fromkeys(range(model.cfg.n_layers), 0))
        model.run_codi(
            question,
            n_latents=2,
            max_new_tokens=1,
            fwd_hooks=[("blocks.0.ln1.hook_scale", lambda x, hook: seen.append(1))],
        )
        assert calls[0] == 3 * chunks and len(seen) == 3 * chunks
        assert all(calls[layer] == chunks for layer in range(1, model.cfg.n_layers))
        calls.update(dict.fromkeys(range(model.cfg.n_layers), 0))
        model.run_codi(question, n_latents=2, max_new_tokens=1)
        assert set(calls.values()) == {chunks}
    finally:
        for handle in handles:
            handle.remove()


def test_gradients_through_the_shared_norm_equal_transformer_lens_block(model, questions):
    """Attribution patching differentiates through every block: the gradient of the last position's logits with
    respect to the token embeddings agrees on both paths (float32; the three inputs' gradients are summed before
    the norm's backward instead of after, so they agree to rounding)."""
    shared = embedding_gradient(model, questions, [])
    own = embedding_gradient(model, questions, _unchanged_ln1(model))
    assert torch.isfinite(shared).all() and shared.abs().max() > 0
    assert torch.allclose(shared, own, rtol=1e-5, atol=1e-6 * float(own.abs().max()))
