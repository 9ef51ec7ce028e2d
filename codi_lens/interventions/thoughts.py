"""Interventions on the fed-back thoughts (``thought.{k}.hook_input``, k = 1..n, 1-based): zero, the mean over a
reference set, Gaussian noise scaled to the thought's norm, another problem's thought (swap), the baseline's
thoughts in shuffled order, or any given value. Later thoughts are recomputed by the real loop from the
changed input. Each returns a list of ``(hook_name, fn)`` pairs for ``fwd_hooks``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from codi_lens.core.hooks import HookFn, Hooks
from codi_lens.core.model import CODIModel
from codi_lens.core.names import thought_hook_name
from codi_lens.run.store import batches_heard


def zero_thoughts(thoughts: Iterable[int]) -> Hooks:
    """Feed zero vectors instead of the listed thoughts (1-based)."""
    return [(thought_hook_name(k, "input"), lambda z, hook: torch.zeros_like(z)) for k in thoughts]


def replace_thoughts(values: Mapping[int, Float[Tensor, "batch d_model"]]) -> Hooks:
    """Feed ``values[k]`` (``[batch, d_model]`` or ``[d_model]``) at thought k instead of the model's own."""

    def make(value: Tensor) -> HookFn:
        return lambda z, hook: value.to(device=z.device, dtype=z.dtype).expand_as(z).clone()

    return [(thought_hook_name(k, "input"), make(v)) for k, v in values.items()]


def mean_thoughts(thoughts: Iterable[int], means: Float[Tensor, "n_latents d_model"]) -> Hooks:
    """Feed the reference mean of thought k (``means[k - 1]``, from :func:`mean_thought_embeds`)."""
    return replace_thoughts({k: means[k - 1] for k in thoughts})


def swap_thoughts(thoughts: Iterable[int], donor_thoughts: Float[Tensor, "batch n_latents d_model"]) -> Hooks:
    """Feed another problem's thought k (``donor_thoughts[:, k - 1]``, e.g. the ``thought_embeds`` of
    the donors' own runs, one donor per example)."""
    return replace_thoughts({k: donor_thoughts[:, k - 1] for k in thoughts})


def derangement(n: int, *, seed: int) -> list[int]:
    """A seeded permutation of ``range(n)`` that moves every element (``n >= 2``)."""
    if n < 2:
        raise ValueError("shuffling needs at least two thoughts")
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(n, generator=generator).tolist()
        if all(i != j for i, j in enumerate(order)):
            return order


def shuffle_thoughts(
    thoughts: Sequence[int], baseline_thoughts: Float[Tensor, "batch n_latents d_model"], *, seed: int
) -> Hooks:
    """Feed the baseline's own thoughts in a seeded shuffled order among ``thoughts``: thought k gets
    the baseline's thought ``perm(k)``, a permutation of ``thoughts`` that moves every one of them
    (a derangement; one thought cannot be shuffled)."""
    thoughts = list(thoughts)
    order = derangement(len(thoughts), seed=seed)
    return replace_thoughts({k: baseline_thoughts[:, thoughts[j] - 1] for k, j in zip(thoughts, order)})


def gaussian_noise_like(
    x: Float[Tensor, " batch *rest"], seeds: Sequence[int], scale: float = 1.0
) -> Float[Tensor, " batch *rest"]:
    """Gaussian noise with one seeded generator per row (so a row's noise does not depend on its
    batch), scaled so that each row's noise has the norm ``scale * ||x_row||`` in expectation over
    directions (``N(0, I) * scale * ||x_row|| / sqrt(numel_row)``)."""
    if len(seeds) != x.shape[0]:
        raise ValueError(f"give one seed per row: {len(seeds)} seeds for {x.shape[0]} rows")
    rows = []
    for row, seed in zip(x, seeds):
        generator = torch.Generator().manual_seed(int(seed))
        noise = torch.randn(row.shape, generator=generator, dtype=torch.float64)
        rows.append(noise * float(scale) * row.double().norm() / row.numel() ** 0.5)
    return torch.stack(rows).to(device=x.device, dtype=x.dtype)


def noise_thoughts(thoughts: Iterable[int], seeds: Sequence[int], scale: float = 1.0) -> Hooks:
    """Add Gaussian noise to thought k, scaled to its norm (see :func:`gaussian_noise_like`); row i
    uses seed ``seeds[i] + k`` so each thought gets its own noise."""

    def make(k: int) -> HookFn:
        return lambda z, hook: z + gaussian_noise_like(z, [s + k for s in seeds], scale)

    return [(thought_hook_name(k, "input"), make(k)) for k in thoughts]


@torch.no_grad()
def mean_thought_embeds(
    model: CODIModel, questions: Sequence[str], *, n_latents: int = 6, batch_size: int = 32, progress: bool = True
) -> Float[Tensor, "n_latents d_model"]:
    """The mean fed thought at each k over a reference set of questions (thoughts only: the answer is
    not generated), with a progress bar over the questions that moves with every transformer block."""
    total, count = None, 0
    for batch in batches_heard(questions, batch_size, model=model, desc="mean thoughts", progress=progress):
        embeds = model.run_latents(batch, n_latents=n_latents).thought_embeds
        batch_sum = embeds.double().sum(0)
        total = batch_sum if total is None else total + batch_sum
        count += embeds.shape[0]
    if total is None:
        raise ValueError("the reference set is empty")
    return (total / count).to(model.cfg.dtype)
