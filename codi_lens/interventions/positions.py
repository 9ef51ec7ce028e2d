"""Interventions on any activation with a position axis, at named positions (``"thought:3"``, ``"eot"``, ...; see
:mod:`codi_lens.core.positions`): zero, mean, noise, replace, add a steering vector (with its random-direction
control). Other positions are untouched; under the KV cache, a position computed in an earlier chunk is not
recomputed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from codi_lens.core.hooks import Hooks, PositionalHook, zero_at_positions
from codi_lens.core.model import CODIModel
from codi_lens.core.positions import Position, gather_at
from codi_lens.interventions.thoughts import gaussian_noise_like


def zero_at(model: CODIModel, hook_name: str, positions: Sequence[Position]) -> Hooks:
    """Zero ``hook_name`` at ``positions`` only."""
    return [(hook_name, zero_at_positions(model, positions))]


def replace_at(
    model: CODIModel, hook_name: str, positions: Sequence[Position], values: Float[Tensor, "batch n_pos *rest"]
) -> Hooks:
    """Write ``values[:, i]`` at ``positions[i]``; ``values`` may also be ``[n_pos, *rest]``, one
    value per position shared by the batch."""
    positions = list(positions)

    def transform(acts: Tensor, hook, which: Tensor) -> Tensor:
        axis = 1 if values.dim() == acts.dim() else 0  # [batch, n_pos, ...] or [n_pos, ...]
        if values.shape[axis] != len(positions):
            raise ValueError(
                f"{hook.name}: values have {values.shape[axis]} positions on axis {axis}, "
                f"but {len(positions)} positions were given"
            )
        chosen = values.index_select(axis, which.to(values.device))
        return chosen.to(device=acts.device, dtype=acts.dtype).expand_as(acts).clone()

    return [(hook_name, PositionalHook(model, positions, transform))]


def mean_at(
    model: CODIModel, hook_name: str, positions: Sequence[Position], means: Float[Tensor, " n_pos *rest"]
) -> Hooks:
    """Write the reference mean (``means[i]``, from :func:`mean_activation`) at ``positions[i]``."""
    return replace_at(model, hook_name, positions, means)


def noise_at(
    model: CODIModel, hook_name: str, positions: Sequence[Position], seeds: Sequence[int], scale: float = 1.0
) -> Hooks:
    """Add Gaussian noise scaled to the activation's norm at each position (one generator per row
    and position: ``seeds[i] + position index``)."""

    def transform(acts: Tensor, hook, which: Tensor) -> Tensor:
        columns = [
            gaussian_noise_like(acts[:, j], [s + int(w) for s in seeds], scale) for j, w in enumerate(which.tolist())
        ]
        return acts + torch.stack(columns, dim=1)

    return [(hook_name, PositionalHook(model, positions, transform))]


def steer(
    model: CODIModel, hook_name: str, positions: Sequence[Position], vector: Float[Tensor, " *rest"], alpha: float = 1.0
) -> Hooks:
    """Add ``alpha * vector`` at ``positions`` (``vector`` matches the activation's trailing shape)."""

    def transform(acts: Tensor, hook, which: Tensor) -> Tensor:
        return acts + float(alpha) * vector.to(device=acts.device, dtype=acts.dtype)

    return [(hook_name, PositionalHook(model, positions, transform))]


def mean_difference(acts_a: Float[Tensor, " n *rest"], acts_b: Float[Tensor, " m *rest"]) -> Float[Tensor, " *rest"]:
    """The steering vector ``mean(acts_a) - mean(acts_b)`` (e.g. thoughts of problems with and
    without a property)."""
    return acts_a.double().mean(0).to(acts_a.dtype) - acts_b.double().mean(0).to(acts_b.dtype)


def random_direction(vector: Float[Tensor, " *shape"], *, seed: int) -> Float[Tensor, " *shape"]:
    """A seeded random direction with the norm of ``vector``: the control for a steering vector."""
    generator = torch.Generator().manual_seed(seed)
    direction = torch.randn(vector.shape, generator=generator, dtype=torch.float64)
    return (direction / direction.norm() * vector.double().norm()).to(device=vector.device, dtype=vector.dtype)


@torch.no_grad()
def mean_activation(
    model: CODIModel,
    questions: Sequence[str],
    hook_name: str,
    positions: Sequence[Position],
    *,
    n_latents: int = 6,
    batch_size: int = 32,
) -> Float[Tensor, "n_pos ..."]:
    """The mean of ``hook_name`` at each named position over a reference set, ``[n_pos, *rest]``.

    Positions are resolved per example (left padding differs), so ``"thought:3"`` is thought 3 in
    every question. Only positions of the question and the latent loop are allowed (answers differ
    in length between problems)."""
    total, count = None, 0
    for start in range(0, len(questions), batch_size):
        batch = list(questions[start : start + batch_size])
        run = model.run_latents(batch, names_filter=hook_name, n_latents=n_latents)
        gathered = gather_at(run.cache[hook_name], run.positions.resolve(list(positions)))
        batch_sum = gathered.double().sum(0)
        total = batch_sum if total is None else total + batch_sum
        count += len(batch)
    if total is None:
        raise ValueError("the reference set is empty")
    return (total / count).to(model.cfg.dtype)
