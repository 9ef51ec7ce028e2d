"""Interventions on continuous thoughts, as ``(hook_name, fn)`` lists for ``run_codi(fwd_hooks=...)``.

All act on ``thought.{k}.hook_input``, the embedding fed at thought k (1-based), so later thoughts are
recomputed by the real latent loop from the changed input. A thought the run does not reach (``k = 0``
or ``k > n_latents``) is refused by the run with a :class:`~codi_lens.hooks.PositionError` naming its
range, before anything runs.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from jaxtyping import Float
from torch import Tensor

from codi_lens.hooks import HookFn, thought_hook_name


def zero_thoughts(thoughts: Iterable[int]) -> list[tuple[str, HookFn]]:
    """Feed zero vectors instead of the listed thoughts (1-based)."""
    return [(thought_hook_name(k, "input"), lambda z, hook: torch.zeros_like(z)) for k in thoughts]


def replace_thoughts(values: Mapping[int, Float[Tensor, "batch d_model"]]) -> list[tuple[str, HookFn]]:
    """Feed ``values[k]`` (``[batch, d_model]`` or ``[d_model]``) at thought k instead of the model's own."""

    def make(value: Tensor) -> HookFn:
        return lambda z, hook: value.to(device=z.device, dtype=z.dtype).expand_as(z).clone()

    return [(thought_hook_name(k, "input"), make(v)) for k, v in values.items()]
