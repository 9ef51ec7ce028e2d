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

Only configurations whose attention is exactly "causal softmax(q k / scale) v" take the fused path
(rotary or learned absolute positions, global causal attention, no soft-capping, sinks, ALiBi, logn
scaling, QKV clipping or per-head results); any other configuration always takes TransformerLens' path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float
from torch import Tensor
from transformer_lens.components import AbstractAttention, Attention, GroupedQueryAttention
from transformer_lens.hook_points import HookPoint

#: Hook points that exist only on TransformerLens' explicit path (the fused one never forms them).
EXPLICIT_ONLY_HOOKS = ("hook_attn_scores", "hook_pattern")


def _unhooked(point: object) -> bool:
    return isinstance(point, HookPoint) and not point.fwd_hooks and not point.bwd_hooks


class FusedAttentionMixin(AbstractAttention):
    """``forward`` of a TransformerLens attention module, fused when no hook needs the explicit pattern.

    Put first among the bases of a subclass of a concrete attention class; it adds no state, so a module's
    class can be swapped for its fused subclass (:func:`fuse_attention`)."""

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
            and cfg.original_architecture not in ("OlmoeForCausalLM", "Olmo2ForCausalLM", "Olmo3ForCausalLM")
            and additive_attention_mask is None
            and position_bias is None
        )
        return plain and all(_unhooked(getattr(self, name)) for name in EXPLICIT_ONLY_HOOKS)

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
        if self.cfg.positional_embedding_type == "rotary":
            q = self.hook_rot_q(self.apply_rotary(q, offset, attention_mask))
            k = self.hook_rot_k(self.apply_rotary(k, 0, attention_mask))
        allowed = self.allowed_keys(q.shape[1], k.shape[1], offset, attention_mask)
        # A query with no key to attend to (a left-pad position) gets z = 0, as on the hooked path; it attends
        # to every key inside the kernel instead, so no NaN enters the forward or the backward pass.
        attends = allowed.any(-1, keepdim=True)
        z = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            attn_mask=allowed | ~attends,
            scale=1.0 / float(self.attn_scale),
            enable_gqa=k.shape[2] != q.shape[2],
        )
        z = self.hook_z(torch.where(attends, z, 0.0).transpose(1, 2))
        return self.project_out(z)

    def rotate_every_two(self, x: Float[Tensor, "... rotary_dim"]) -> Float[Tensor, "... rotary_dim"]:
        """``[x1, x2] -> [-x2, x1]`` over the halves of the last axis (LLaMA's rotary layout) in two ops, where
        TransformerLens clones ``x`` and writes both halves into the clone; the same values on both paths.
        Adjacent-pair layouts (GPT-J) keep TransformerLens' own."""
        if self.cfg.rotary_adjacent_pairs:
            return super().rotate_every_two(x)
        half = x.size(-1) // 2
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

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


class FusedAttention(FusedAttentionMixin, Attention):
    """TransformerLens ``Attention`` (one key/value head per query head, e.g. GPT-2), fused when unhooked."""


class FusedGroupedQueryAttention(FusedAttentionMixin, GroupedQueryAttention):
    """TransformerLens ``GroupedQueryAttention`` (LLaMA), fused on the grouped keys and values when unhooked."""


#: The fused class of each TransformerLens attention class codi_lens models use.
FUSED_CLASSES = {Attention: FusedAttention, GroupedQueryAttention: FusedGroupedQueryAttention}


def fuse_attention(blocks) -> None:
    """Give every block's attention module the fused ``forward`` (same parameters, hook points and state)."""
    for block in blocks:
        fused = FUSED_CLASSES.get(type(block.attn))
        if fused is not None:
            block.attn.__class__ = fused
