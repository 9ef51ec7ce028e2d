"""A transformer block that normalises its residual once for the attention, not once per query, key and value.

TransformerLens' block calls its first norm (``ln1``) three times, on the query, key and value inputs, which are
one tensor unless the configuration splits them per head, and adds 0.0 to the first two (the place of a
shortformer positional embedding). The three results are the same values, so one call serves all three. In the
latent loop every step is a short chunk through every layer, where the cost of a block is as much its number of
operations (and backward nodes) as its matrix products; the two extra norms and their ``+ 0.0`` are 14 of them.

:class:`SharedNormBlock` takes that path only when nothing can tell the difference: a plain pre-norm block
(shared query, key and value input, no per-head input, no norm after attention or MLP, no parallel attention and
MLP, not attention-only, no shortformer embedding) whose ``ln1`` hook points (``hook_scale``, ``hook_normalized``)
have no hook. A hook there sees TransformerLens' own block, three calls per forward, for as long as it is there.
Every other hook point of the block fires once per forward, as in TransformerLens, on the same values bit for bit
(``tests/test_shared_norm.py``); the gradient into the residual sums the three inputs' gradients before the
norm's backward instead of after, which changes it only by float rounding.
"""

from __future__ import annotations

from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens.components import TransformerBlock
from transformer_lens.utilities.architectures import POST_NORM_ARCHITECTURES

from codi_lens.core.hooks import has_hooks


class SharedNormBlock(TransformerBlock):
    """TransformerLens' ``TransformerBlock`` with one ``ln1`` call for the attention's three inputs when no hook
    is on ``ln1``; TransformerLens' own ``forward`` otherwise."""

    def shared_norm_applies(self, shortformer_pos_embed: Tensor | None) -> bool:
        """Whether this call may normalise once: a plain pre-norm block and no hook on ``ln1``."""
        cfg = self.cfg
        plain = (
            not cfg.use_attn_in
            and not cfg.use_split_qkv_input
            and not cfg.use_normalization_before_and_after
            and not cfg.attn_only
            and not cfg.parallel_attn_mlp
            and cfg.original_architecture not in POST_NORM_ARCHITECTURES
            and shortformer_pos_embed is None
        )
        return plain and not has_hooks(self.ln1)

    def forward(
        self,
        resid_pre: Float[Tensor, "batch pos d_model"],
        shortformer_pos_embed: Float[Tensor, "batch pos d_model"] | None = None,
        past_kv_cache_entry=None,
        attention_mask: Int[Tensor, "batch offset_pos"] | None = None,
    ) -> Float[Tensor, "batch pos d_model"]:
        if not self.shared_norm_applies(shortformer_pos_embed):
            return super().forward(resid_pre, shortformer_pos_embed, past_kv_cache_entry, attention_mask)
        resid_pre = self.hook_resid_pre(resid_pre)
        normalized = self.ln1(resid_pre)
        attn_out = self.hook_attn_out(
            self.attn(
                query_input=normalized,
                key_input=normalized,
                value_input=normalized,
                past_kv_cache_entry=past_kv_cache_entry,
                attention_mask=attention_mask,
            )
        )
        if resid_pre.device != attn_out.device:  # a model split over devices, as TransformerLens moves it
            resid_pre = resid_pre.to(attn_out.device)
        resid_mid = self.hook_resid_mid(resid_pre + attn_out)
        mlp_in = self.hook_mlp_in(resid_mid.clone()) if self.cfg.use_hook_mlp_in else resid_mid
        return self.hook_resid_post(resid_mid + self.apply_mlp(self.ln2(mlp_in)))


def share_attention_norm(blocks) -> None:
    """Give every TransformerLens ``TransformerBlock`` among ``blocks`` the one-norm ``forward`` (same parameters,
    hook points and state); blocks of other classes keep theirs."""
    for block in blocks:
        if type(block) is TransformerBlock:
            block.__class__ = SharedNormBlock
