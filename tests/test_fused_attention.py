"""The fused attention path (no per-head expansion of grouped keys and values) against TransformerLens' own
explicit path, hook point by hook point, and the switch between them.

The explicit path is TransformerLens' code (its attention scores, mask, softmax and pattern); a no-op hook on
``hook_pattern`` makes a module take it. The two are compared on the tiny LLaMA (grouped query heads) and
GPT-2 checkpoints, on questions of different lengths in one batch (left padding), through the loop's KV cache
and through decoding. The whole loop against HF + peft is ``test_parity.py``'s (it runs the fused path).
"""

from __future__ import annotations

from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from embedding_gradients import embedding_gradient

from codi_lens import load_codi
from codi_lens.core.fused_attention import FusedAttention, FusedGroupedQueryAttention

#: Every hook point of an attention module that both paths fire.
SHARED_POINTS = ("hook_q", "hook_k", "hook_v", "hook_z")
ROTARY_POINTS = ("hook_rot_q", "hook_rot_k")
#: float32: the fused kernel sums in another order than the explicit softmax and matmul.
ATOL = 1e-5


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def model(request, tiny_checkpoint):
    ckpt = tiny_checkpoint(request.param, "safetensors" if request.param == "llama" else "bin")
    return load_codi(ckpt.checkpoint_dir, ckpt.base_dir)


def _points(model) -> list[str]:
    points = SHARED_POINTS + (ROTARY_POINTS if model.cfg.positional_embedding_type == "rotary" else ())
    return [f"blocks.{layer}.attn.{p}" for layer in range(model.cfg.n_layers) for p in points]


def _explicit_everywhere(model) -> list[tuple[str, object]]:
    """A hook that changes nothing on every layer's pattern: every module takes the explicit path."""
    return [(f"blocks.{layer}.attn.hook_pattern", lambda x, hook: x) for layer in range(model.cfg.n_layers)]


def test_the_blocks_take_the_fused_class(model):
    expected = FusedGroupedQueryAttention if model.cfg.n_key_value_heads else FusedAttention
    assert all(type(block.attn) is expected for block in model.blocks)


def test_every_shared_hook_sees_the_same_activation_on_both_paths(model, questions):
    """Questions of different lengths in one batch, the six thoughts through the KV cache and decoded answers:
    each activation at every attention hook point, and the run's latents and step logits, agree."""
    fused, fused_cache = model.run_codi_with_cache(
        questions, names_filter=_points(model), max_new_tokens=6, return_logits=True
    )
    explicit, explicit_cache = model.run_codi_with_cache(
        questions,
        names_filter=_points(model),
        max_new_tokens=6,
        return_logits=True,
        fwd_hooks=_explicit_everywhere(model),
    )
    assert fused.answer_tokens == explicit.answer_tokens
    for name in _points(model):
        assert fused_cache[name].shape == explicit_cache[name].shape, name
        assert torch.allclose(fused_cache[name], explicit_cache[name], atol=ATOL), name
    assert torch.allclose(fused.latent_states, explicit.latent_states, atol=ATOL)
    assert torch.allclose(fused.step_logits, explicit.step_logits, atol=ATOL)


def test_queries_keys_and_their_rotation_are_bit_identical_on_both_paths(model):
    """The fused path gathers each chunk's rotary tables once for every layer (``ChunkMemo``); the explicit path
    is TransformerLens' ``apply_rotary``, per layer. For a chunk of 2 positions after 3 cached ones, one row
    left-padded (and with no mask), ``hook_q``/``hook_k``/``hook_v`` and the rotated queries and keys of every
    layer are equal bit for bit (each layer fed the same input on both paths)."""
    from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry

    points = ("hook_q", "hook_k", "hook_v") + (ROTARY_POINTS if model.cfg.positional_embedding_type == "rotary" else ())
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(2, 2, model.cfg.d_model, generator=generator)
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    n_kv = model.cfg.n_key_value_heads or model.cfg.n_heads
    past = [torch.randn(2, 3, n_kv, model.cfg.d_head, generator=generator) for _ in range(2)]

    def seen(explicit: bool, mask: torch.Tensor | None) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        hooks = [
            (f"blocks.{layer}.attn.{p}", lambda a, hook: out.__setitem__(hook.name, a.clone()))
            for layer in range(model.cfg.n_layers)
            for p in points
        ]
        with model.hooks(fwd_hooks=hooks + (_explicit_everywhere(model) if explicit else [])):
            for block in model.blocks:
                entry = TransformerLensKeyValueCacheEntry(*past, frozen=True)
                block.attn(x, x, x, past_kv_cache_entry=entry, attention_mask=mask)
        return out

    for chunk_mask in (mask, None):
        fused, explicit = seen(False, chunk_mask), seen(True, chunk_mask)
        assert len(fused) == model.cfg.n_layers * len(points)
        for name, activation in fused.items():
            assert torch.equal(activation, explicit[name]), (name, chunk_mask)


def test_heads_linear_equals_transformer_lens_simple_attn_linear():
    """The projection into heads, without ``einops``, gives TransformerLens' own numbers bit for bit."""
    from transformer_lens.utilities.attention import simple_attn_linear

    from codi_lens.core.fused_attention import heads_linear

    generator = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(*shape, generator=generator) for shape in ((3, 5, 24), (4, 24, 6), (4, 6)))
    ours = heads_linear(x, w, b)
    assert ours.shape == (3, 5, 4, 6)
    assert torch.equal(ours, simple_attn_linear(x, w, b))


def test_the_chunk_memo_recomputes_when_the_mask_changes(model):
    """The memo knows a chunk by its mask's values: the same shapes with another mask, or the same mask edited in
    place, compute afresh, and each call equals the explicit path on its own mask. Calls on the same mask,
    unchanged, share one ``ChunkShared``."""
    attention = model.blocks[0].attn
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, model.cfg.d_model, generator=generator)
    mask = torch.ones(2, 5, dtype=torch.long)

    def both(mask):
        fused = attention(x, x, x, attention_mask=mask)
        hook = [("blocks.0.attn.hook_pattern", lambda p, hook: p)]
        with model.hooks(fwd_hooks=hook):
            explicit = attention(x, x, x, attention_mask=mask)
        return fused, explicit

    fused, explicit = both(mask)
    assert torch.allclose(fused, explicit, atol=ATOL)
    first = attention.chunk_memo.shared
    attention(x, x, x, attention_mask=mask)
    assert attention.chunk_memo.shared is first
    assert model.blocks[-1].attn.chunk_memo is attention.chunk_memo
    mask[1, :3] = 0  # the same mask, edited in place
    fused_edited, explicit_edited = both(mask)
    assert torch.allclose(fused_edited, explicit_edited, atol=ATOL)
    assert not torch.allclose(fused_edited[1], fused[1], atol=1e-3)
    padded = torch.ones(2, 5, dtype=torch.long)  # another mask object of the same shape
    padded[0, :2] = 0
    fused_padded, explicit_padded = both(padded)
    assert torch.allclose(fused_padded, explicit_padded, atol=ATOL)
    assert not torch.allclose(fused_padded[0], fused[0], atol=1e-3)


def test_layers_share_a_memo_only_when_their_rotary_tables_agree(model):
    """``same_rotary_tables``: two layers of one model agree (GPT-2: neither has tables); a table grown to more
    positions agrees with a shorter one over their common rows; a table with one value changed does not."""
    import copy

    from codi_lens.core.fused_attention import same_rotary_tables

    first, other = model.blocks[0].attn, copy.deepcopy(model.blocks[1].attn)
    assert same_rotary_tables(first, other)
    if model.cfg.positional_embedding_type != "rotary":
        return
    other._extend_rotary_embeddings(2 * other.rotary_cos.shape[0])
    assert same_rotary_tables(first, other) and same_rotary_tables(other, first)
    other.rotary_sin[3, 0] += 1e-3
    assert not same_rotary_tables(first, other)


def test_a_left_pad_query_gets_zero_z_on_both_paths(model, questions):
    """The shortest question's left-pad positions attend to no key: z is exactly 0 there, on both paths."""
    name = "blocks.0.attn.hook_z"
    fused = model.run_codi_with_cache(questions, names_filter=[name], max_new_tokens=1)[1][name]
    explicit = model.run_codi_with_cache(
        questions, names_filter=[name], max_new_tokens=1, fwd_hooks=_explicit_everywhere(model)
    )[1][name]
    lengths = [len(model.tokenize_questions([q])[0][0]) for q in questions]
    pads = max(lengths) - min(lengths)
    shortest = lengths.index(min(lengths))
    assert pads > 0
    assert (fused[shortest, :pads] == 0).all() and (explicit[shortest, :pads] == 0).all()


def test_a_hook_on_z_changes_the_run_the_same_way_on_both_paths(model, questions):
    """``hook_z`` is fired on the fused path too: a hook that scales one head's z moves the run, and moves
    it to the same place as on the explicit path."""

    def scale_head(z, hook):
        z = z.clone()
        z[:, :, 0] *= 3.0
        return z

    hooks = [("blocks.0.attn.hook_z", scale_head)]
    plain = model.run_codi(questions, max_new_tokens=4, return_logits=True)
    fused = model.run_codi(questions, max_new_tokens=4, return_logits=True, fwd_hooks=hooks)
    explicit = model.run_codi(
        questions, max_new_tokens=4, return_logits=True, fwd_hooks=hooks + _explicit_everywhere(model)
    )
    assert (fused.latent_states - plain.latent_states).abs().max() > 1e-3
    assert torch.allclose(fused.latent_states, explicit.latent_states, atol=ATOL)


def test_the_pattern_hook_switches_paths_per_module(model):
    """With no hook the kernel runs once per block and pass; a hook on one block's pattern (or its scores)
    sends that block, and only it, to the explicit path; removing the hook brings the kernel back."""
    question = ["Uma owns 8 cards. How many cards does Uma own?"]
    calls = []
    kernel = F.scaled_dot_product_attention

    def counted(*args, **kwargs):
        calls.append(1)
        return kernel(*args, **kwargs)

    n_layers = model.cfg.n_layers
    with mock.patch("torch.nn.functional.scaled_dot_product_attention", counted):
        model.run_codi(question, n_latents=2, max_new_tokens=1)
        passes = len(calls) // n_layers
        assert len(calls) == passes * n_layers and passes >= 3  # question, two thoughts, at least one token
        for point in ("hook_pattern", "hook_attn_scores"):
            calls.clear()
            model.run_codi(
                question, n_latents=2, max_new_tokens=1, fwd_hooks=[(f"blocks.0.attn.{point}", lambda x, hook: x)]
            )
            assert len(calls) == passes * (n_layers - 1), point
        calls.clear()
        model.run_codi(question, n_latents=2, max_new_tokens=1)
        assert len(calls) == passes * n_layers


def test_gradients_through_the_fused_path_equal_the_explicit_path(model, questions):
    """Attribution patching differentiates through attention: the gradient of the answer logits with respect
    to the fed thoughts is the same on both paths (left padding included, no NaN from masked rows)."""
    fused = embedding_gradient(model, questions, [])
    explicit = embedding_gradient(model, questions, _explicit_everywhere(model))
    assert torch.isfinite(fused).all()
    assert torch.allclose(fused, explicit, atol=ATOL)


def test_a_hook_editing_z_in_place_leaves_the_backward_pass_right(model, questions):
    """TransformerLens hooks often edit an activation in place. One that zeroes a head's ``z`` in place under
    autograd must not touch what the attention's backward reads (the kernel's output): the gradient is the one the
    same edit gives out of place."""

    def grad(edit):
        return embedding_gradient(model, questions, [("blocks.0.attn.hook_z", edit)])

    def in_place(z, hook):
        z[:, :, 0] = 0.0
        return z

    def out_of_place(z, hook):
        z = z.clone()
        z[:, :, 0] = 0.0
        return z

    edited, reference = grad(in_place), grad(out_of_place)
    assert torch.isfinite(edited).all() and not torch.equal(edited, grad(lambda z, hook: z))
    assert torch.equal(edited, reference)


def test_a_run_copies_no_weight(model, questions):
    """Every weight is stored in the memory order the block's calls read it (``store_weights_for_linear``), so a
    whole run (question, thoughts, decoding) never copies a parameter: no clone, copy or conversion reads a
    parameter's storage. Without the layout, TransformerLens copies W_Q/W_K/W_V (its ``rearrange``) and the
    MLP and unembedding weights (``.T.contiguous()``) on every call."""
    from torch.utils._python_dispatch import TorchDispatchMode

    aten = torch.ops.aten
    copying = {aten.clone.default, aten._to_copy.default, aten.copy_.default, aten.contiguous.default}
    weights = {p.untyped_storage().data_ptr(): name for name, p in model.named_parameters()}

    class CopiedWeights(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names: set[str] = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in copying:
                source = args[1] if func is aten.copy_.default else args[0]
                if isinstance(source, torch.Tensor):
                    name = weights.get(source.untyped_storage().data_ptr())
                    if name is not None:
                        self.names.add(name)
            return func(*args, **(kwargs or {}))

    with CopiedWeights() as recorder:
        model.run_codi(questions[:2], max_new_tokens=3)
    assert recorder.names == set()


def test_laying_out_a_filled_model_again_keeps_every_value(model):
    """``store_weights_for_linear`` on a loaded model (values kept) changes no parameter's shape or value, and
    every parameter it lays out ends in the memory order its calls read (the permuted view is contiguous)."""
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    model.store_weights_for_linear()
    for name, p in model.named_parameters():
        assert p.shape == before[name].shape and torch.equal(p, before[name]), name
        order = model.linear_memory_order(name)
        if order is not None:
            assert p.permute(order).is_contiguous(), name
    assert any(model.linear_memory_order(name) for name in before)


def test_the_direct_unembedding_gives_transformer_lens_logits_and_hooks(model, questions):
    """``DirectUnembed`` multiplies by ``W_U`` as stored (its logical ``[d_model, d_vocab]`` order, so nothing is
    copied per call): the logits equal TransformerLens' ``Unembed`` on the same residual to float32 rounding, and
    a hook on ``unembed.hook_in`` changes them as it would there."""
    from transformer_lens.components import Unembed

    from codi_lens.core.unembed import DirectUnembed

    unembed = model.unembed
    assert type(unembed) is DirectUnembed and unembed.W_U.is_contiguous()
    residual = torch.randn(2, 3, model.cfg.d_model)
    direct = unembed(residual)
    unembed.__class__ = Unembed
    try:
        reference = unembed(residual)
    finally:
        unembed.__class__ = DirectUnembed
    assert torch.allclose(direct, reference, atol=ATOL)
    tokens, _ = model.tokenize_questions(questions[:1])
    halved = model.run_with_hooks(tokens, fwd_hooks=[("unembed.hook_in", lambda x, hook: x / 2)], return_type="logits")
    seen = model.run_with_cache(tokens, names_filter="unembed.hook_in")[1]["unembed.hook_in"]
    assert torch.allclose(halved, (seen / 2) @ unembed.W_U + unembed.b_U, atol=ATOL)
