"""Recording activations across the KV-cache chunks of a CODI run: one recorder for caches, gradients and
pathways.

A CODI run is many small forwards (the question, one per thought, one per answer token), so a hook sees
one chunk at a time. :class:`ActivationRecorder` records them in one of two ways:

- detached (caches, :meth:`CODIModel.run_codi_with_cache`): each chunk's activations are written straight
  into one buffer per hook, laid out over the whole sequence, instead of keeping every chunk's tensor and
  joining them at the end: a run then holds a few large allocations rather than thousands of small ones.
  That matters on the CPU, where glibc's allocator cannot give back the pages of freed temporaries that
  sit between small long-lived tensors: recording every hook of the 1B-shaped model chunk by chunk grew
  the process by about 16 MB per generated token per layer beyond what it stored (see
  ``benchmarks/cache_memory.py``). Buffers grow by doubling along the position axes, capped at the run's
  longest possible sequence, and are cut to the positions written when the run ends.
- ``keep_graph=True`` (gradients through the loop, feature pathways): each chunk's tensor is kept as
  computed, attached to the autograd graph, with the chunk it came from, so a metric can be
  differentiated with respect to it.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens.hook_points import HookPoint

from codi_lens.core.names import position_axis, spans_every_cached_position
from codi_lens.core.positions import ChunkContext, ChunkScope


def fill_value(hook_name: str) -> float:
    """What stands where an attention activation has no value (a key not yet visible to a query)."""
    return float("-inf") if hook_name.endswith("hook_attn_scores") else 0.0


class _SequenceBuffer:
    """One hook's activation over the whole sequence, ``[batch, pos, ...]`` or, for attention,
    ``[batch, head, query_pos, key_pos]``; grows along its position axes."""

    def __init__(self, name: str, axis: int, max_positions: int, device: torch.device | str | None):
        self.name, self.axis, self.max_positions, self.device = name, axis, max_positions, device
        self.data: Tensor | None = None
        self.length = 0

    def _capacity_for(self, needed: int) -> int:
        current = 0 if self.data is None else self.data.shape[self.axis]
        if needed <= current:
            return current
        return min(max(needed, 2 * current), max(needed, self.max_positions))

    def _grow(self, like: Tensor, needed: int) -> None:
        capacity = self._capacity_for(needed)
        if self.data is not None and capacity == self.data.shape[self.axis]:
            return
        shape = list(like.shape)
        shape[self.axis] = capacity
        if self.axis == 2:  # attention: keys grow with queries
            shape[3] = capacity
        device = self.device or like.device
        grown = torch.full(shape, fill_value(self.name), dtype=like.dtype, device=device)
        if self.data is not None:
            old = self.data
            if self.axis == 2:
                grown[:, :, : old.shape[2], : old.shape[3]] = old
            else:
                grown[:, : old.shape[1]] = old
        self.data = grown

    def write(self, acts: Tensor, start: int) -> None:
        """Write one chunk's activation, which covers positions ``start .. start + n - 1``."""
        n = acts.shape[self.axis]
        self._grow(acts, start + n)
        if self.axis == 2:
            self.data[:, :, start : start + n, : acts.shape[3]] = acts
        else:
            self.data[:, start : start + n] = acts
        self.length = max(self.length, start + n)

    def finish(self) -> Float[Tensor, "batch pos *rest"]:
        """The buffer cut to the positions written (a compact copy when it was larger)."""
        data, n = self.data, self.length
        if data.shape[self.axis] == n:
            return data
        if self.axis == 2:
            return data[:, :, :n, :n].clone()
        return data[:, :n].clone()


class ActivationRecorder:
    """A forward hook that records activations across a CODI run's chunks (see the module docstring).

    In a Jacobi loop (PCCoT) only the last sweep's positional activations are recorded (the ones the answer
    reads); per-sweep ones are at the sweep hooks (``thought.k.sweep.s.hook_*``), which are recorded.

    Detached (default): positional activations go to whole-sequence buffers (a hook firing twice in one
    chunk, as TransformerLens' ``ln1`` does for queries, keys and values, keeps its last value); rotated keys,
    which cover every cached position, are cut to the chunk's own positions; per-step thought and
    projection activations (no position axis) are stacked to ``[batch, steps, ...]`` (:meth:`tensors`).

    ``keep_graph=True``: every chunk's tensor is kept as computed, with autograd (:meth:`chunks`,
    :meth:`whole`, :meth:`at`), and passed on unchanged.

    Args:
        scope: the model's :class:`~codi_lens.core.positions.ChunkScope` (the current chunk's position map
            bounds how far buffers grow).
        device: where detached recordings live (default: where each activation is computed).
        keep_graph: keep each chunk's tensor attached to the autograd graph instead of copying it.
    """

    def __init__(self, scope: ChunkScope, device: torch.device | str | None = None, *, keep_graph: bool = False):
        self._scope = scope
        self._device = device
        self.keep_graph = keep_graph
        self._sequences: dict[str, _SequenceBuffer] = {}
        self._steps: dict[str, list[Tensor]] = defaultdict(list)
        self._chunks: dict[str, list[tuple[ChunkContext | None, Tensor]]] = defaultdict(list)

    def __call__(self, acts: Tensor, hook: HookPoint) -> None:
        name = hook.name
        axis = position_axis(name)
        if axis is not None and not self._scope.current.is_final:
            return  # a Jacobi sweep before the last: the last sweep computes these positions again
        if self.keep_graph:
            self._chunks[name].append((None if axis is None else self._scope.current, acts))
            return
        acts = acts.detach()
        if axis is None:
            self._steps[name].append(acts.to(self._device or acts.device))
            return
        context = self._scope.current
        start = context.start
        if spans_every_cached_position(name):
            acts = acts.narrow(1, start, len(context.span))
        if name not in self._sequences:
            positions = context.positions
            longest = positions.answer_start + max(positions.answer_lengths, default=0)
            self._sequences[name] = _SequenceBuffer(name, axis, longest, self._device)
        self._sequences[name].write(acts, start)

    def tensors(self) -> dict[str, Float[Tensor, "batch ..."]]:
        """Every detached recording, whole-sequence or stacked per step; the recorder is emptied."""
        out: dict[str, Tensor] = {}
        for name in list(self._sequences):  # one buffer at a time, so the peak stays near one cache
            out[name] = self._sequences.pop(name).finish()
        for name in list(self._steps):
            steps = self._steps.pop(name)
            out[name] = steps[0] if len(steps) == 1 else torch.stack(steps, dim=1)
        return out

    def chunks(self, name: str) -> list[Tensor]:
        """With ``keep_graph``: the tensors ``name`` produced, one per chunk (or step), in the order computed."""
        return [tensor for _, tensor in self._chunks[name]]

    def whole(self, name: str) -> Float[Tensor, "batch pos *rest"]:
        """With ``keep_graph``: the chunks of a positional activation joined along the position axis, from the
        first chunk recorded on."""
        return torch.cat(self.chunks(name), dim=1)

    def at(self, name: str, position: str | int) -> tuple[Tensor, int | None]:
        """With ``keep_graph``: the recorded tensor of ``name`` holding ``position`` and its index on the
        position axis (the same in every row: named latent positions align across a batch); for a hook
        without a position axis, its last recorded tensor and None. ``KeyError`` if it was never recorded."""
        for context, tensor in reversed(self._chunks[name]):
            if context is None:
                return tensor, None
            index = int(context.index_in_chunk(position)[0])
            if index >= 0:
                return tensor, index
        raise KeyError(f"{name} was not recorded at {position!r}")
