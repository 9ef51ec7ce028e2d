"""Attention without the per-head expansion when no hook needs it.

TransformerLens computes attention as explicit scores, a mask, a softmax and a pattern, so that
``hook_attn_scores`` and ``hook_pattern`` can see and change them; for grouped-query attention (LLaMA: 32
query heads sharing 8 key/value heads) it first repeats every key and value head to every query head it
serves. When neither of those two hook points has a hook (forward or backward) and nothing replaces them,
no one sees the scores or the pattern, and the same attention can be computed by
``torch.nn.functional.scaled_dot_product_attention`` on the grouped keys and values (``enable_gqa``).

The fused path fires every other hook point of the attention exactly where the hooked path fires it:
``hook_q``, ``hook_k``, ``hook_v`` (keys and values per key/value head, as TransformerLens gives them),
``hook_rot_q``, ``hook_rot_k`` and ``hook_z`` (``[batch, pos, head, d_head]``), so hooks there (patching,
caching, SAEs) work on either path. The moment a hook is added to ``hook_attn_scores`` or ``hook_pattern``
the module takes TransformerLens' own path for that call. A query that may attend to no key (a left-pad
position) gets ``z = 0`` on both paths. The two paths agree to float32 rounding (the tests compare them
and the HF reference at 1e-5).

What does not depend on the layer is computed once per chunk, not once per layer: the rotary tables gathered at
the chunk's positions and the causal and padding mask (:class:`ChunkMemo`, shared by a model's attention modules).
The queries and keys are rotated as TransformerLens' ``apply_rotary`` rotates them, with the sign of its
``rotate_every_two`` moved into the sine table (an exact rewrite), so ``hook_rot_q`` and ``hook_rot_k`` are equal
bit for bit on both paths.

Only configurations whose attention is exactly "causal softmax(q k / scale) v" take the fused path
(rotary or learned absolute positions, global causal attention, no soft-capping, sinks, ALiBi, logn
scaling, dynamic NTK rotary, QKV clipping or per-head results); any other configuration always takes
TransformerLens' path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor
from transformer_lens.components import AbstractAttention, Attention, GroupedQueryAttention
from transformer_lens.hook_points import HookPoint
from transformer_lens.utilities.tensors import get_offset_position_ids

from codi_lens.core.hooks import has_hooks

#: Hook points that exist only on TransformerLens' explicit path (the fused one never forms them).
EXPLICIT_ONLY_HOOKS = ("hook_attn_scores", "hook_pattern")


def heads_linear(
    x: Float[Tensor, "batch pos d_model"], w: Float[Tensor, "head d_model d_head"], b: Float[Tensor, "head d_head"]
) -> Float[Tensor, "batch pos head d_head"]:
    """``x`` through per-head weights as one ``F.linear``, the weights laid out as TransformerLens'
    ``simple_attn_linear`` lays them out (``(head d_head) d_model``), so the numbers are its numbers."""
    return F.linear(x, w.permute(0, 2, 1).reshape(-1, w.shape[1]), b.reshape(-1)).unflatten(-1, tuple(b.shape))


@dataclass(frozen=True)
class ChunkShared:
    """What every layer's attention computes alike for one chunk: the rotary tables gathered at its queries' and
    keys' positions (None without rotary), and its mask as the kernel takes it.

    ``kernel_mask`` is the causal and padding mask, except that a query with no key to attend to (a left-pad
    position) attends to every key inside the kernel, so that no NaN enters; ``attends`` says which queries have
    a key, and their ``z`` is kept (the others get ``z = 0``, as on the explicit path).

    ``sin_q`` and ``sin_k`` carry the sign of LLaMA's ``rotate_every_two`` (``[x1, x2] -> [-x2, x1]``): their first
    half is negated, so that :meth:`FusedAttentionMixin.rotate` multiplies ``[x2, x1]`` by them (an exact
    rewrite: ``(-a) * b == a * (-b)`` in floating point). Adjacent-pair layouts (GPT-J) keep the table as it is."""

    cos_q: Tensor | None
    sin_q: Tensor | None
    cos_k: Tensor | None
    sin_k: Tensor | None
    kernel_mask: Bool[Tensor, "batch_or_1 1 query_pos key_pos"]
    attends: Bool[Tensor, "batch_or_1 1 query_pos 1"]


class ChunkMemo:
    """The last chunk's :class:`ChunkShared`, held for the attention modules of one model whose rotary tables are
    equal, so that it is computed once per chunk rather than once per layer.

    A chunk is recognised by its attention mask's values (a copy is kept, so a mask edited in place is a new
    chunk) and by its query, key and cached lengths, dtype, device and inference mode; any other call computes
    afresh. It holds no activation, and no hook reads it."""

    def __init__(self) -> None:
        #: ``(mask copy, key, shared)`` of the last chunk, replaced as one tuple
        self.last: tuple[Tensor | None, tuple, ChunkShared] | None = None

    def lookup(
        self,
        module: FusedAttentionMixin,
        q: Float[Tensor, "batch pos head d_head"],
        n_keys: int,
        offset: int,
        attention_mask: Int[Tensor, "batch key_pos"] | None,
    ) -> ChunkShared:
        key = (q.shape[1], n_keys, offset, q.dtype, q.device, torch.is_inference_mode_enabled(), attention_mask is None)
        last = self.last
        if last is not None and last[1] == key and same_mask(last[0], attention_mask):
            return last[2]
        shared = module.chunk_shared(q.shape[1], n_keys, offset, attention_mask)
        self.last = (None if attention_mask is None else attention_mask.detach().clone(), key, shared)
        return shared

    @property
    def shared(self) -> ChunkShared | None:
        """The last chunk's :class:`ChunkShared` (None before the first)."""
        return None if self.last is None else self.last[2]


def same_mask(kept: Tensor | None, mask: Tensor | None) -> bool:
    """Whether two attention masks (or two absent ones) have the same values."""
    if kept is None or mask is None:
        return kept is None and mask is None
    return kept.shape == mask.shape and kept.device == mask.device and torch.equal(kept, mask)


class FusedAttentionMixin(AbstractAttention):
    """``forward`` of a TransformerLens attention module, fused when no hook needs the explicit pattern.

    Put first among the bases of a subclass of a concrete attention class; its only state is the
    :class:`ChunkMemo` that :func:`fuse_attention` gives it when it swaps a module's class for its fused
    subclass."""

    def fused_path_applies(self, additive_attention_mask: Tensor | None, position_bias: Tensor | None) -> bool:
        """Whether this call may take the fused path: the configuration is plain causal attention and no hook
        (or attached module) sits on the scores or the pattern."""
        cfg = self.cfg
        plain = (
            cfg.positional_embedding_type in ("rotary", "standard")
            and (self._attention_dir_override or cfg.attention_dir) == "causal"
            and self.attn_type == "global"
            and not cfg.use_attn_result
            and not cfg.load_in_4bit
            and not cfg.use_attention_sinks
            and not cfg.use_logn_attn
            and cfg.clip_qkv is None
            and not cfg.attn_scores_soft_cap > 0
            and not cfg.use_dynamic_ntk_rope
            and cfg.original_architecture not in ("OlmoeForCausalLM", "Olmo2ForCausalLM", "Olmo3ForCausalLM")
            and additive_attention_mask is None
            and position_bias is None
        )
        points = [getattr(self, name) for name in EXPLICIT_ONLY_HOOKS]
        return plain and all(isinstance(p, HookPoint) and not has_hooks(p) for p in points)

    def forward(
        self,
        query_input: Float[Tensor, "batch pos d_model"],
        key_input: Float[Tensor, "batch kv_pos d_model"],
        value_input: Float[Tensor, "batch kv_pos d_model"],
        past_kv_cache_entry=None,
        additive_attention_mask: Tensor | None = None,
        attention_mask: Tensor | None = None,
        position_bias: Tensor | None = None,
    ) -> Float[Tensor, "batch pos d_model"]:
        if not self.fused_path_applies(additive_attention_mask, position_bias):
            return super().forward(
                query_input,
                key_input,
                value_input,
                past_kv_cache_entry=past_kv_cache_entry,
                additive_attention_mask=additive_attention_mask,
                attention_mask=attention_mask,
                position_bias=position_bias,
            )
        q, k, v = self.calculate_qkv_matrices(query_input, key_input, value_input)
        offset = 0
        if past_kv_cache_entry is not None:
            offset = past_kv_cache_entry.past_keys.size(1)
            k, v = past_kv_cache_entry.append(k, v)
        shared = self.chunk_memo.lookup(self, q, k.shape[1], offset, attention_mask)
        if self.cfg.positional_embedding_type == "rotary":
            q = self.hook_rot_q(self.rotate(q, shared.cos_q, shared.sin_q))
            k = self.hook_rot_k(self.rotate(k, shared.cos_k, shared.sin_k))
        # A query with no key to attend to (a left-pad position) gets z = 0, as on the hooked path; it attends
        # to every key inside the kernel instead, so no NaN enters the forward or the backward pass.
        z = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            attn_mask=shared.kernel_mask,
            scale=1.0 / float(self.attn_scale),
            enable_gqa=k.shape[2] != q.shape[2],
        )
        # torch.where also gives hook_z a tensor of its own: a hook editing it in place leaves the kernel's output,
        # which its backward reads, as it was.
        z = self.hook_z(torch.where(shared.attends, z, 0.0).transpose(1, 2))
        return self.project_out(z)

    def calculate_qkv_matrices(self, query_input, key_input, value_input):
        """Queries, keys and values as TransformerLens computes them (one ``F.linear`` each, the same weights in the
        same layout, so the same numbers), without its per-call ``einops`` parsing; configurations with per-head
        inputs, 4-bit weights or query/key norms keep TransformerLens' own."""
        cfg = self.cfg
        if cfg.use_split_qkv_input or cfg.use_attn_in or cfg.load_in_4bit or cfg.use_qk_norm:
            return super().calculate_qkv_matrices(query_input, key_input, value_input)
        grouped = isinstance(self, GroupedQueryAttention) and not cfg.ungroup_grouped_query_attention
        w_k, b_k = (self._W_K, self._b_K) if grouped else (self.W_K, self.b_K)
        w_v, b_v = (self._W_V, self._b_V) if grouped else (self.W_V, self.b_V)
        q = self.hook_q(heads_linear(query_input, self.W_Q, self.b_Q))
        k = self.hook_k(heads_linear(key_input, w_k, b_k))
        v = self.hook_v(heads_linear(value_input, w_v, b_v))
        return q, k, v

    def rotate(
        self, x: Float[Tensor, "batch pos head d_head"], cos: Tensor, sin: Tensor
    ) -> Float[Tensor, "batch pos head d_head"]:
        """TransformerLens' ``apply_rotary`` with this chunk's tables already gathered: ``x_rot * cos +
        rotate_every_two(x_rot) * sin``, then the unrotated dimensions. In LLaMA's layout ``sin`` comes with
        ``rotate_every_two``'s sign folded in (see :class:`ChunkShared`), so the rotation is one ``roll`` of the
        halves where TransformerLens clones ``x`` and writes both halves into the clone: the same values, bit for bit,
        with fewer operations (and backward nodes). Adjacent-pair layouts (GPT-J) keep TransformerLens' own."""
        rotary_dim = self.cfg.rotary_dim
        x_rot = x if rotary_dim == x.shape[-1] else x[..., :rotary_dim]
        if self.cfg.rotary_adjacent_pairs:
            turned = self.rotate_every_two(x_rot)
        else:
            turned = x_rot.roll(rotary_dim // 2, dims=-1)  # [x1, x2] -> [x2, x1]; the sign is in sin
        rotated = x_rot * cos + turned * sin
        if rotary_dim == x.shape[-1]:
            return rotated
        return torch.cat([rotated, x[..., rotary_dim:]], dim=-1)

    def chunk_shared(
        self, n_queries: int, n_keys: int, offset: int, attention_mask: Int[Tensor, "batch key_pos"] | None
    ) -> ChunkShared:
        """This chunk's rotary tables and mask, gathered as TransformerLens' ``apply_rotary`` gathers them (keys at
        positions ``0..n_keys``, queries at the last ``n_queries``; with a mask, positions count attended tokens
        only) and masked as :meth:`allowed_keys` says."""
        allowed = self.allowed_keys(n_queries, n_keys, offset, attention_mask)
        attends = allowed.any(-1, keepdim=True)
        tables: tuple[Tensor | None, ...] = (None, None, None, None)
        if self.cfg.positional_embedding_type == "rotary":
            if n_keys > self.rotary_cos.shape[0]:  # TransformerLens' own growth rule
                self._extend_rotary_embeddings(min(self.cfg.n_ctx, max(n_keys, 2 * self.rotary_cos.shape[0])))
            if attention_mask is None:
                cos_k, sin_k = (t[None, :n_keys, None, :] for t in (self.rotary_cos, self.rotary_sin))
                cos_q, sin_q = (
                    t[None, offset : offset + n_queries, None, :] for t in (self.rotary_cos, self.rotary_sin)
                )
            else:
                ids = get_offset_position_ids(0, attention_mask).to(self.rotary_cos.device)
                cos_k, sin_k = self.rotary_cos[ids, None, :], self.rotary_sin[ids, None, :]
                cos_q, sin_q = cos_k[:, offset:], sin_k[:, offset:]
            if not self.cfg.rotary_adjacent_pairs:
                sin_q, sin_k = fold_rotation_sign(sin_q), fold_rotation_sign(sin_k)
            tables = (cos_q, sin_q, cos_k, sin_k)
        return ChunkShared(*tables, kernel_mask=allowed | ~attends, attends=attends)

    def allowed_keys(
        self, n_queries: int, n_keys: int, offset: int, attention_mask: Tensor | None
    ) -> Bool[Tensor, "batch_or_1 1 query_pos key_pos"]:
        """Which key each query may attend to: causally (query i at position offset + i sees keys 0..offset + i)
        and not a padded key (``attention_mask`` over all keys, cache included), as TransformerLens masks."""
        device = attention_mask.device if attention_mask is not None else self.IGNORE.device
        causal = self._make_causal_mask(
            query_ctx_length=n_queries, key_ctx_length=n_keys, past_kv_pos_offset=offset, device=device
        )  # [1, 1, query_pos, key_pos]
        if attention_mask is None:
            return causal
        return causal & attention_mask[:, None, None, -n_keys:].bool()

    def project_out(self, z: Float[Tensor, "batch pos head d_head"]) -> Float[Tensor, "batch pos d_model"]:
        """``z`` through ``W_O`` and ``b_O`` as TransformerLens' own (non per-head) path does."""
        w = self.W_O.permute(2, 0, 1).reshape(self.cfg.d_model, -1)
        return F.linear(z.reshape(*z.shape[:2], -1).to(w.dtype), w, self.b_O)


def fold_rotation_sign(sin: Float[Tensor, "... rotary_dim"]) -> Float[Tensor, "... rotary_dim"]:
    """The sine table with its first half negated: the sign ``rotate_every_two`` gives ``x2`` in LLaMA's layout."""
    half = sin.shape[-1] // 2
    return torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)


class FusedAttention(FusedAttentionMixin, Attention):
    """TransformerLens ``Attention`` (one key/value head per query head, e.g. GPT-2), fused when unhooked."""


class FusedGroupedQueryAttention(FusedAttentionMixin, GroupedQueryAttention):
    """TransformerLens ``GroupedQueryAttention`` (LLaMA), fused on the grouped keys and values when unhooked."""


#: The fused class of each TransformerLens attention class codi_lens models use.
FUSED_CLASSES = {Attention: FusedAttention, GroupedQueryAttention: FusedGroupedQueryAttention}


def fuse_attention(blocks) -> None:
    """Give every block's attention module the fused ``forward`` (same parameters, hook points and state), and one
    :class:`ChunkMemo` to each group of modules whose rotary tables are equal (all of a model's, in practice)."""
    groups: list[tuple[FusedAttentionMixin, ChunkMemo]] = []
    for block in blocks:
        fused = FUSED_CLASSES.get(type(block.attn))
        if fused is None:
            continue
        block.attn.__class__ = fused
        memo = next((memo for first, memo in groups if same_rotary_tables(first, block.attn)), None)
        if memo is None:
            memo = ChunkMemo()
            groups.append((block.attn, memo))
        block.attn.chunk_memo = memo


def same_rotary_tables(a: AbstractAttention, b: AbstractAttention) -> bool:
    """Whether two attention modules gather the same rotary values at every position (both without rotary, or
    tables of the same dtype and device, equal over their common length: TransformerLens computes each position's
    row on its own, so a table grown later agrees with the shorter one where both exist)."""
    pairs = [(getattr(a, name, None), getattr(b, name, None)) for name in ("rotary_cos", "rotary_sin")]
    present = [x is not None for pair in pairs for x in pair]
    if not any(present):
        return True
    if not all(present) or a.cfg.rotary_dim != b.cfg.rotary_dim:
        return False
    return all(x.dtype == y.dtype and x.device == y.device and torch.equal(x[: len(y)], y[: len(x)]) for x, y in pairs)
