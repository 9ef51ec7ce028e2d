"""Feature edits of an attached SAE as ordinary ``fwd_hooks`` on ``<hook>.hook_sae_acts_post``: ablate, scale,
clamp or swap features at the SAE's site (the registry :data:`FEATURE_OPS`); and the clamp's control, the same
push along a random direction (:func:`random_direction_edit`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from jaxtyping import Float
from sae_lens import SAE
from torch import Tensor

from codi_lens.core.hooks import Hooks
from codi_lens.core.model import CODIModel
from codi_lens.core.names import sae_hook_name
from codi_lens.core.registry import Registry
from codi_lens.saes.io import sae_site
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


def random_unit_vector(d: int, seed: int) -> Float[Tensor, " d"]:
    """A unit vector drawn uniformly on the sphere in ``d`` dimensions (a seeded normal draw, normalised)."""
    vector = torch.randn(d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (vector / vector.norm()).float()


def random_direction_edit(
    model: CODIModel, sae: SAE, feature: int, value: float, before: Float[Tensor, " batch"], seed: int
) -> Hooks:
    """The control of a clamp: what clamping ``feature`` to ``value`` adds at the SAE's site, ``(value -
    before) * W_dec[feature]`` per row (``before``: the feature's unedited activation of each row), but along a
    random unit direction of the same norm (:func:`random_unit_vector`). A clamp whose effect on the answer is
    no larger than this control's says only that the site tolerates no push of that size, not what the
    feature means. Acts on the SAE's output (``<hook>.hook_sae_output``), at the site's position only."""
    site = sae_site(sae)
    norm = float(sae.W_dec[feature].detach().norm())
    direction = random_unit_vector(sae.cfg.d_in, seed) * norm
    shift = (value - before.double()).float()[:, None] * direction[None, :]  # [batch, d_in]
    scope = model.chunk_scope

    def push(output: Tensor, hook) -> Tensor:
        delta = shift.to(output.device, output.dtype)
        if site.is_thought_hook:
            return output + delta
        index = scope.current.index_in_chunk(site.position).to(output.device)
        rows = torch.nonzero(index >= 0).flatten()
        output = output.clone()
        output[rows, index[rows]] += delta[rows]
        return output

    return [(sae_hook_name(site.hook, "output"), push)]
