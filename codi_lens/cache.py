"""Recording activations across the KV-cache chunks of a CODI run into whole-sequence tensors.

A CODI run is many small forwards (the question, one per thought, one per answer token). The cache
writes each chunk's activations straight into one buffer per hook, laid out over the whole
sequence, instead of keeping every chunk's tensor and joining them at the end: a run then holds a
few large allocations rather than thousands of small ones. That matters on the CPU, where glibc's
allocator cannot give back the pages of freed temporaries that sit between small long-lived
tensors: recording every hook of the 1B-shaped model chunk by chunk grew the process by about 16 MB
per generated token per layer beyond what it stored (see ``benchmarks/cache_memory.py``).

Buffers grow by doubling along the position axes, capped at the run's longest possible sequence,
and are cut to the positions written when the run ends.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import Tensor

from codi_lens.hooks import ChunkContext, position_axis, spans_every_cached_position


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

    def finish(self) -> Tensor:
        """The buffer cut to the positions written (a compact copy when it was larger)."""
        data, n = self.data, self.length
        if data.shape[self.axis] == n:
            return data
        if self.axis == 2:
            return data[:, :, :n, :n].clone()
        return data[:, :n].clone()


class ActivationRecorder:
    """A forward hook that records activations across a CODI run's chunks.

    Positional activations go to whole-sequence buffers (a hook firing twice in one chunk, as
    TransformerLens' ``ln1`` does for queries, keys and values, keeps its last value). Rotated keys,
    which cover every cached position, are cut to the chunk's own positions. Per-step thought and
    projection activations (no position axis) are stacked to ``[batch, steps, ...]``.

    Args:
        chunk_context: returns the current chunk's :class:`~codi_lens.hooks.ChunkContext` (its
            layout's answer budget bounds how far buffers grow).
        device: where the recorded tensors live (default: where each activation is computed).
    """

    def __init__(self, chunk_context, device: torch.device | str | None = None):
        self._chunk_context = chunk_context
        self._device = device
        self._sequences: dict[str, _SequenceBuffer] = {}
        self._steps: dict[str, list[Tensor]] = defaultdict(list)

    def __call__(self, acts: Tensor, hook) -> None:
        name, acts = hook.name, acts.detach()
        axis = position_axis(name)
        if axis is None:
            self._steps[name].append(acts.to(self._device or acts.device))
            return
        context: ChunkContext = self._chunk_context()
        start = context.start
        if spans_every_cached_position(name):
            acts = acts.narrow(1, start, len(context.positions))
        if name not in self._sequences:
            layout = context.layout
            longest = layout.answer_start + max(layout.answer_lengths, default=0)
            self._sequences[name] = _SequenceBuffer(name, axis, longest, self._device)
        self._sequences[name].write(acts, start)

    def tensors(self) -> dict[str, Tensor]:
        """Every recorded activation, whole-sequence or stacked per step; the recorder is emptied."""
        out: dict[str, Tensor] = {}
        for name in list(self._sequences):  # one buffer at a time, so the peak stays near one cache
            out[name] = self._sequences.pop(name).finish()
        for name in list(self._steps):
            steps = self._steps.pop(name)
            out[name] = steps[0] if len(steps) == 1 else torch.stack(steps, dim=1)
        return out
