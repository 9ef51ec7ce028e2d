"""Feature edits of an attached SAE as ordinary ``fwd_hooks`` on ``<hook>.hook_sae_acts_post``: ablate, scale,
clamp or swap features at the SAE's site (the registry :data:`FEATURE_OPS`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from sae_lens import SAE
from torch import Tensor

from codi_lens.core.hooks import Hooks
from codi_lens.core.registry import Registry
from codi_lens.saes.splice import sae_acts_hook_name

#: ``edit(acts, index, value)`` of each feature op: ``acts`` ``[..., d_sae]`` (a copy), ``index`` the features.
FEATURE_OPS: Registry[Callable[[Tensor, Tensor, float | Tensor], None]] = Registry("feature op")


@FEATURE_OPS.register("ablate")
def _ablate(acts: Tensor, index: Tensor, value: float | Tensor) -> None:
    acts[..., index] = 0


@FEATURE_OPS.register("scale")
def _scale(acts: Tensor, index: Tensor, value: float | Tensor) -> None:
    acts[..., index] = acts[..., index] * value


@FEATURE_OPS.register("clamp")
def _clamp(acts: Tensor, index: Tensor, value: float | Tensor) -> None:
    acts[..., index] = float(value)


@FEATURE_OPS.register("swap")
def _swap(acts: Tensor, index: Tensor, value: float | Tensor) -> None:
    donor = torch.as_tensor(value, device=acts.device, dtype=acts.dtype)
    shape = (donor.shape[0],) + (1,) * (acts.dim() - 2) + (len(index),)
    acts[..., index] = donor.reshape(shape).expand(*acts.shape[:-1], len(index))


def feature_edit(sae: SAE, features: Sequence[int], op: str, value: float | Tensor = 0.0) -> Hooks:
    """``fwd_hooks`` editing features of an attached SAE: ``ablate`` (set to 0), ``scale`` (multiply by
    ``value``), ``clamp`` (set to ``value``), ``swap`` (set to ``value[batch, len(features)]``, e.g. another
    problem's activations of the same features). Applied where the SAE is applied (its thought). An unknown
    ``op`` is refused before any run (a ChoiceError naming the ops)."""
    apply = FEATURE_OPS[op]
    index = torch.as_tensor(list(features), dtype=torch.long)

    def edit(acts: Tensor, hook) -> Tensor:
        acts = acts.clone()
        apply(acts, index.to(acts.device), value)
        return acts

    return [(sae_acts_hook_name(sae), edit)]
