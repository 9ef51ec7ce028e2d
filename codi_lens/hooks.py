"""Hook names for continuous thoughts, and hooks that act at absolute sequence positions.

Position convention (used everywhere in codi_lens). For a question padded on the left to ``L``
tokens, the CODI sequence is::

    position:  0 .. L-1      L     L+1 .. L+n     L+n+1   L+n+2 ..
    content:   question      BOT   thought 1..n   EOT     answer tokens

*Thought k* (1-based, ``k = 1..n``) is the position fed the k-th continuous thought ``z_k``. Hook
index ``k = 0`` is the BOT position. At every index ``k = 0..n`` the model produces ``h_k``, the
post-final-norm hidden state at that position (HF ``hidden_states[-1]``), and ``prj(h_k)``, which is
fed back at thought ``k + 1`` (``prj(h_n)`` is computed and discarded, as upstream does).

Hook points, one per step, named like TransformerLens' (``thought.{k}.hook_*``):

- ``thought.{k}.hook_input``       (k = 1..n) the embedding fed at thought k        ``[batch, d_model]``
- ``thought.{k}.hook_hidden``      (k = 0..n) ``h_k``, what the projection consumes ``[batch, d_model]``
- ``thought.{k}.hook_projection``  (k = 0..n) ``prj(h_k)``                          ``[batch, d_model]``

``thought.{k}.hook_input`` receives ``thought.{k-1}.hook_projection`` unless a hook changes it.
The projection head itself has hook points ``prj.hook_in``, ``prj.hook_mid`` (after GELU) and
``prj.hook_out``, which fire at every step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Literal

import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens.hook_points import HookPoint

if TYPE_CHECKING:
    from codi_lens.model import CODIModel

ThoughtHookKind = Literal["input", "hidden", "projection"]
THOUGHT_HOOK_KINDS: tuple[ThoughtHookKind, ...] = ("input", "hidden", "projection")

HookFn = Callable[[Tensor, HookPoint], Tensor | None]
PositionTransform = Callable[[Tensor, HookPoint, Tensor], Tensor]


def thought_hook_name(k: int, kind: ThoughtHookKind = "hidden") -> str:
    """Name of the hook point of thought step ``k`` (``0`` = BOT), e.g. ``thought.3.hook_hidden``."""
    if kind not in THOUGHT_HOOK_KINDS:
        raise ValueError(f"kind must be one of {THOUGHT_HOOK_KINDS}, got {kind!r}")
    if k < 0 or (kind == "input" and k == 0):
        raise ValueError(f"no {kind!r} hook at thought {k}: inputs are k >= 1, hidden/projection k >= 0")
    return f"thought.{k}.hook_{kind}"


def position_axis(hook_name: str) -> int | None:
    """The sequence-position axis of an activation, or None for per-step thought/projection hooks.

    Attention scores and patterns are ``[batch, head, query_pos, key_pos]`` (axis 2 = query); the
    other TransformerLens activations are ``[batch, pos, ...]`` (axis 1).
    """
    if hook_name.startswith(("thought.", "prj.")):
        return None
    if hook_name.endswith(("hook_pattern", "hook_attn_scores")):
        return 2
    return 1


def positional_hook(model: CODIModel, positions: Iterable[int], transform: PositionTransform) -> HookFn:
    """A hook that applies ``transform`` only at the given absolute positions.

    Inside the CODI loop the model runs in chunks under a KV cache (the question, then one
    position at a time), so an activation seen by a hook usually covers only the current chunk. This
    hook maps absolute positions to the chunk (via ``model.current_positions``) and calls
    ``transform(acts, hook, abs_positions)`` with ``acts`` of shape ``[batch, n_sel, ...]`` (the
    selected positions moved to axis 1), expecting a tensor of the same shape back. Positions not in
    the current chunk are untouched; chunks without selected positions are passed through.

    Rotated keys (``hook_rot_k``) are recomputed over every cached position at each chunk; for them
    the hook acts at its positions in every chunk, so the edit holds for all later queries, as it
    would in one full pass.
    """
    wanted = torch.as_tensor(sorted(set(positions)), dtype=torch.long)

    def hook_fn(acts: Tensor, hook: HookPoint) -> Tensor:
        axis = position_axis(hook.name)
        if axis is None:
            raise ValueError(f"{hook.name} has no position axis; hook it directly instead")
        chunk = model.current_positions.to(wanted.device)
        if acts.shape[axis] != len(chunk):  # the activation spans every cached position 0..n-1
            chunk = torch.arange(acts.shape[axis])
        local = torch.nonzero(torch.isin(chunk, wanted)).flatten()
        if local.numel() == 0:
            return acts
        local = local.to(acts.device)
        selected = acts.index_select(axis, local).movedim(axis, 1)
        replaced = transform(selected, hook, chunk[local.cpu()]).movedim(1, axis)
        out = acts.clone()
        out.index_copy_(axis, local, replaced.to(acts.dtype))
        return out

    return hook_fn


def replace_at_positions(
    model: CODIModel, positions: Iterable[int], values: Float[Tensor, "batch n_pos *rest"]
) -> HookFn:
    """A hook writing ``values[:, i]`` at the i-th of ``positions`` (sorted ascending)."""
    ordered = sorted(set(positions))
    index = {p: i for i, p in enumerate(ordered)}

    def transform(acts: Tensor, hook: HookPoint, abs_positions: Tensor) -> Tensor:
        rows = torch.as_tensor([index[int(p)] for p in abs_positions], dtype=torch.long)
        return values.index_select(1, rows.to(values.device)).to(acts.device)

    return positional_hook(model, ordered, transform)


def zero_at_positions(model: CODIModel, positions: Iterable[int]) -> HookFn:
    """A hook zeroing the activation at the given absolute positions."""
    return positional_hook(model, positions, lambda acts, hook, pos: torch.zeros_like(acts))
