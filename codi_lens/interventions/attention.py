"""Interventions on attention: knock out attention to chosen positions (on the scores, so the softmax
renormalises; or on the pattern, renormalised by hand), and ablate heads at ``hook_z`` (a head's own output,
before ``W_O`` mixes heads).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from jaxtyping import Float
from torch import Tensor

from codi_lens.core.hooks import Hooks, PositionalHook
from codi_lens.core.model import CODIModel
from codi_lens.core.names import act_name
from codi_lens.core.positions import Position


def knockout_attention(
    model: CODIModel,
    keys: Sequence[Position],
    *,
    layers: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    method: Literal["scores", "pattern"] = "scores",
) -> Hooks:
    """Stop every later position attending to the ``keys`` positions (e.g. ``["thought:2"]``).

    ``method="scores"`` sets the scores to ``-inf`` before the softmax (which renormalises);
    ``"pattern"`` zeroes the weights after it and divides each row by its new sum. Both give the
    same pattern. ``layers``: default all. ``heads``: query heads (default all); with grouped-query
    attention the key/value head is shared, so knocking out one query head leaves the others of its
    group untouched. A position still attends to itself (a key is knocked out for queries after it).
    """
    layers = list(range(model.cfg.n_layers)) if layers is None else list(layers)
    point = "attn_scores" if method == "scores" else "pattern"
    if method not in ("scores", "pattern"):
        raise ValueError(f"method must be 'scores' or 'pattern', got {method!r}")
    head_index = None if heads is None else torch.tensor(list(heads))

    def hook(acts: Float[Tensor, "batch head query key"], hook) -> Tensor:
        context = model.chunk_scope.current
        key_positions = context.positions.resolve(list(keys)).to(acts.device)  # [batch, n_keys]
        queries = context.span.to(acts.device)  # [query]
        n_keys = acts.shape[-1]
        blocked = torch.zeros(acts.shape[0], queries.shape[0], n_keys, dtype=torch.bool, device=acts.device)
        later = queries[None, :, None] > key_positions[:, None, :]  # [batch, query, n_keys]
        index = key_positions[:, None, :].expand(-1, queries.shape[0], -1).clamp(max=n_keys - 1)
        blocked.scatter_(2, index, later & (key_positions[:, None, :] < n_keys))
        mask = blocked[:, None].expand(-1, acts.shape[1], -1, -1).clone()
        if head_index is not None:
            keep = torch.ones(acts.shape[1], dtype=torch.bool, device=acts.device)
            keep[head_index.to(acts.device)] = False
            mask[:, keep] = False
        if method == "scores":
            return acts.masked_fill(mask, float("-inf"))
        kept = acts.masked_fill(mask, 0.0)
        return kept / kept.sum(-1, keepdim=True).clamp_min(torch.finfo(acts.dtype).tiny)

    return [(act_name(point, layer), hook) for layer in layers]


def ablate_heads(
    model: CODIModel,
    layer: int,
    heads: Sequence[int],
    *,
    positions: Sequence[Position] | None = None,
    means: Float[Tensor, "head d_head"] | None = None,
) -> Hooks:
    """Zero (or set to ``means[h]``) the output of query heads ``heads`` at ``blocks.{layer}.attn.hook_z``,
    at every position or only at ``positions``. ``hook_z`` is ``[batch, pos, head, d_head]``: each
    head's own output, before ``W_O`` mixes the heads."""
    heads = list(heads)
    name = act_name("z", layer)

    def edit(acts: Tensor) -> Tensor:
        out = acts.clone()
        index = torch.tensor(heads, device=acts.device)
        if means is None:
            out[..., index, :] = 0.0
        else:
            out[..., index, :] = means[index.cpu()].to(device=acts.device, dtype=acts.dtype)
        return out

    if positions is None:
        return [(name, lambda acts, hook: edit(acts))]
    return [(name, PositionalHook(model, positions, lambda acts, hook, which: edit(acts)))]
