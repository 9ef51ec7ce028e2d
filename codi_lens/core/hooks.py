"""Hooks that act at named positions of a CODI run, and the type of a hook list.

A :class:`PositionalHook` applies a transform only at chosen positions (``"thought:3"``, ``"eot"``,
absolute ints), resolved against each run's position map (:mod:`codi_lens.core.positions`), in whichever
chunk of the run computes them. Interventions are lists of ``(hook_name, fn)`` pairs (:data:`Hooks`), as
TransformerLens' ``fwd_hooks`` take them; lists compose by concatenation (:func:`compose`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from codi_lens.core.errors import PositionError
from codi_lens.core.names import position_axis
from codi_lens.core.positions import ChunkScope, CODIPositions, Position

HookFn = Callable[[Tensor, HookPoint], Tensor | None]
#: ``(hook name, fn)`` pairs for ``fwd_hooks``; hooks on one hook point run in the order given.
Hooks = list[tuple[str, HookFn]]
#: ``transform(acts, hook, which)``: ``acts`` is ``[batch, n_here, ...]`` (the selected positions moved
#: to axis 1), ``which`` indexes the positions the hook was given (``[n_here]``, in the caller's order).
PositionTransform = Callable[[Tensor, HookPoint, Int[Tensor, " n_here"]], Tensor]


class HasChunkScope(Protocol):
    """What a positional hook needs of the model it is built for: the scope its runs publish chunks in."""

    chunk_scope: ChunkScope


def has_hooks(module: nn.Module) -> bool:
    """Whether any hook point in ``module`` (``module`` itself included) has a forward or backward hook: what
    decides whether codi_lens' fused attention and shared-norm block may skip the hook points TransformerLens
    would fire."""
    return any(isinstance(m, HookPoint) and (m.fwd_hooks or m.bwd_hooks) for m in module.modules())


def compose(*interventions: Hooks) -> Hooks:
    """One intervention applying each of ``interventions`` (in order where they share a hook)."""
    return [pair for hooks in interventions for pair in hooks]


class PositionalHook:
    """A hook that applies ``transform`` only at the given positions (names or absolute ints).

    Positions are resolved against each run's position map, so ``"thought:3"`` follows the thought
    when batches are padded to different widths. ``transform(acts, hook, which)`` receives the
    activation at the selected positions, ``[batch, n_here, ...]`` in the order the positions were
    given (``which`` indexes them), and returns a tensor of the same shape. Every other position is
    passed through untouched. Rotated keys (``hook_rot_k``) cover every cached position, so for them
    the edit is applied at each chunk and holds for all later queries, as in one full pass.

    Raises :class:`PositionContextError` if it fires outside a CODI run, and :class:`PositionError`
    (from the run's checks, before anything runs) for positions the run does not reach.
    """

    def __init__(self, model: HasChunkScope, positions: Sequence[Position], transform: PositionTransform):
        if isinstance(positions, (str, int)):
            raise TypeError("positions must be a list, e.g. ['thought:3'] or [12]")
        self.scope = model.chunk_scope
        self.positions = list(positions)
        if len(set(self.positions)) != len(self.positions):
            raise PositionError(f"positions {self.positions} name a position twice")
        self.transform = transform
        self._resolved: tuple[CODIPositions, Tensor] | None = None

    def resolve(self, positions: CODIPositions) -> Int[Tensor, "batch n"]:
        """Absolute positions per example (memoised for the last position map seen)."""
        if self._resolved is None or self._resolved[0] is not positions:
            self._resolved = (positions, positions.resolve(self.positions))
        return self._resolved[1]

    def __call__(self, acts: Tensor, hook: HookPoint) -> Tensor:
        axis = position_axis(hook.name)
        if axis is None:
            raise ValueError(f"{hook.name} has no position axis; hook it directly instead")
        context = self.scope.current
        covered = context.positions_of(hook.name)
        if acts.shape[axis] != len(covered):
            raise RuntimeError(
                f"{hook.name}: activation has {acts.shape[axis]} positions on axis {axis} but the chunk covers "
                f"{len(covered)} ({int(covered[0])}..{int(covered[-1])})"
            )
        wanted = self.resolve(context.positions).to(acts.device)
        first, last = int(covered[0]), int(covered[-1])
        inside = (wanted >= first) & (wanted <= last)
        if context.sweep is not None:  # a sweep of a Jacobi loop: only the positions addressed at this sweep
            reached = torch.tensor([context.reaches(p) for p in self.positions], device=inside.device)
            inside = inside & reached[None]
        if bool((inside.any(0) & ~inside.all(0)).any()):
            raise PositionError(f"{self.positions} fall in different chunks for different examples on {hook.name}")
        which = torch.nonzero(inside.all(0)).flatten()
        if which.numel() == 0:
            return acts
        moved = acts.movedim(axis, 1)
        index = (wanted[:, which] - first).reshape(wanted.shape[0], -1, *([1] * (moved.dim() - 2)))
        index = index.expand(-1, -1, *moved.shape[2:])
        replaced = self.transform(moved.gather(1, index), hook, which.cpu())
        if replaced.shape != index.shape:
            raise ValueError(f"transform returned {tuple(replaced.shape)} for {tuple(index.shape)} at {hook.name}")
        return moved.scatter(1, index, replaced.to(acts.dtype)).movedim(1, axis)


def positional_hook(
    model: HasChunkScope, positions: Sequence[Position], transform: PositionTransform
) -> PositionalHook:
    """A :class:`PositionalHook`: ``transform`` applied only at ``positions`` (names or absolute ints)."""
    return PositionalHook(model, positions, transform)


def replace_at_positions(
    model: HasChunkScope, positions: Sequence[Position], values: Float[Tensor, "batch n_pos *rest"]
) -> PositionalHook:
    """A hook writing ``values[:, i]`` at ``positions[i]``, in the order given (duplicates refused)."""
    positions = list(positions)
    if values.shape[1] != len(positions):
        raise ValueError(f"values has {values.shape[1]} positions on axis 1 but {len(positions)} positions were given")

    def transform(acts: Tensor, hook: HookPoint, which: Tensor) -> Tensor:
        return values.index_select(1, which.to(values.device)).to(device=acts.device, dtype=acts.dtype)

    return PositionalHook(model, positions, transform)


def zero_at_positions(model: HasChunkScope, positions: Sequence[Position]) -> PositionalHook:
    """A hook zeroing the activation at the given positions."""
    return PositionalHook(model, positions, lambda acts, hook, which: torch.zeros_like(acts))
