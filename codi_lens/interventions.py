"""Interventions inside the CODI loop, each a list of ``(hook_name, fn)`` pairs for the ``fwd_hooks``
of ``run_codi``, ``run_codi_with_cache`` and ``score_answers``. Lists compose by concatenation
(:func:`compose`); hooks on one hook point run in the order given.

Three families:

- **On the fed-back thought** (``thought.{k}.hook_input``, k = 1..n, 1-based): zero, the mean over a
  reference set, Gaussian noise scaled to the thought's norm, another problem's thought (swap), the
  baseline's thoughts in shuffled order. Later thoughts are recomputed by the real loop from the
  changed input. :func:`thought_scope` turns a scope (single thought k, cumulative 1..k, all) into
  the thoughts to change.
- **On any activation with a position axis, at named positions** (``"thought:3"``, ``"eot"``, ...;
  see :mod:`codi_lens.hooks`): zero, mean, noise, replace, add a steering vector. Other positions
  are untouched; under the KV cache, a position computed in an earlier chunk is not recomputed.
- **On attention**: knock out attention to chosen positions (on the scores, so the softmax
  renormalises; or on the pattern, renormalised by hand), and ablate heads at ``hook_z`` (a head's
  own output, before ``W_O`` mixes heads).

A thought or position the run does not reach is refused by the run with a
:class:`~codi_lens.hooks.PositionError` naming its range, before anything runs.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Literal

import torch
from jaxtyping import Float
from torch import Tensor

from codi_lens.hooks import HookFn, Position, PositionalHook, thought_hook_name, zero_at_positions

Scope = Literal["single", "cumulative", "all"]
SCOPES: tuple[Scope, ...] = ("single", "cumulative", "all")
Hooks = list[tuple[str, HookFn]]


def compose(*interventions: Hooks) -> Hooks:
    """One intervention applying each of ``interventions`` (in order where they share a hook)."""
    return [pair for hooks in interventions for pair in hooks]


def thought_scope(scope: Scope, k: int, n_latents: int) -> list[int]:
    """The thoughts (1-based) a scope covers: ``single`` = [k], ``cumulative`` = 1..k, ``all`` = 1..n
    (``k`` is ignored for ``all``)."""
    if scope == "all":
        return list(range(1, n_latents + 1))
    if not 1 <= k <= n_latents:
        raise ValueError(f"thought {k} is outside 1..{n_latents}")
    if scope == "single":
        return [k]
    if scope == "cumulative":
        return list(range(1, k + 1))
    raise ValueError(f"unknown scope {scope!r}; expected one of {SCOPES}")


# ---------------------------------------------------------------------- on the fed-back thought
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


def shuffle_thoughts(
    thoughts: Sequence[int], baseline_thoughts: Float[Tensor, "batch n_latents d_model"], *, seed: int
) -> Hooks:
    """Feed the baseline's own thoughts in a seeded shuffled order among ``thoughts``: thought k gets
    the baseline's thought ``perm(k)``, a permutation of ``thoughts`` that moves every one of them
    (a derangement; one thought cannot be shuffled)."""
    thoughts = list(thoughts)
    if len(thoughts) < 2:
        raise ValueError("shuffling needs at least two thoughts")
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(thoughts), generator=generator).tolist()
        if all(i != j for i, j in enumerate(order)):
            break
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
    model, questions: Sequence[str], *, n_latents: int = 6, batch_size: int = 32
) -> Float[Tensor, "n_latents d_model"]:
    """The mean fed thought at each k over a reference set of questions (thoughts only: the answer is
    not generated)."""
    total, count = None, 0
    for start in range(0, len(questions), batch_size):
        batch = list(questions[start : start + batch_size])
        embeds = model.run_codi(batch, n_latents=n_latents, max_new_tokens=1).thought_embeds
        batch_sum = embeds.double().sum(0)
        total = batch_sum if total is None else total + batch_sum
        count += embeds.shape[0]
    if total is None:
        raise ValueError("the reference set is empty")
    return (total / count).to(model.cfg.dtype)


# ---------------------------------------------------------------------- at named positions
def zero_at(model, hook_name: str, positions: Sequence[Position]) -> Hooks:
    """Zero ``hook_name`` at ``positions`` only."""
    return [(hook_name, zero_at_positions(model, positions))]


def replace_at(
    model, hook_name: str, positions: Sequence[Position], values: Float[Tensor, "batch n_pos *rest"]
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


def mean_at(model, hook_name: str, positions: Sequence[Position], means: Float[Tensor, " n_pos *rest"]) -> Hooks:
    """Write the reference mean (``means[i]``, from :func:`mean_activation`) at ``positions[i]``."""
    return replace_at(model, hook_name, positions, means)


def noise_at(model, hook_name: str, positions: Sequence[Position], seeds: Sequence[int], scale: float = 1.0) -> Hooks:
    """Add Gaussian noise scaled to the activation's norm at each position (one generator per row
    and position: ``seeds[i] + position index``)."""

    def transform(acts: Tensor, hook, which: Tensor) -> Tensor:
        columns = [
            gaussian_noise_like(acts[:, j], [s + int(w) for s in seeds], scale) for j, w in enumerate(which.tolist())
        ]
        return acts + torch.stack(columns, dim=1)

    return [(hook_name, PositionalHook(model, positions, transform))]


def steer(
    model, hook_name: str, positions: Sequence[Position], vector: Float[Tensor, " *rest"], alpha: float = 1.0
) -> Hooks:
    """Add ``alpha * vector`` at ``positions`` (``vector`` matches the activation's trailing shape)."""

    def transform(acts: Tensor, hook, which: Tensor) -> Tensor:
        return acts + float(alpha) * vector.to(device=acts.device, dtype=acts.dtype)

    return [(hook_name, PositionalHook(model, positions, transform))]


def mean_difference(acts_a: Float[Tensor, " n *rest"], acts_b: Float[Tensor, " m *rest"]) -> Float[Tensor, " *rest"]:
    """The steering vector ``mean(acts_a) - mean(acts_b)`` (e.g. thoughts of problems with and
    without a property)."""
    return acts_a.double().mean(0).to(acts_a.dtype) - acts_b.double().mean(0).to(acts_b.dtype)


def random_direction(vector: Tensor, *, seed: int) -> Tensor:
    """A seeded random direction with the norm of ``vector``: the control for a steering vector."""
    generator = torch.Generator().manual_seed(seed)
    direction = torch.randn(vector.shape, generator=generator, dtype=torch.float64)
    return (direction / direction.norm() * vector.double().norm()).to(device=vector.device, dtype=vector.dtype)


@torch.no_grad()
def mean_activation(
    model,
    questions: Sequence[str],
    hook_name: str,
    positions: Sequence[Position],
    *,
    n_latents: int = 6,
    batch_size: int = 32,
) -> Tensor:
    """The mean of ``hook_name`` at each named position over a reference set, ``[n_pos, *rest]``.

    Positions are resolved per example (left padding differs), so ``"thought:3"`` is thought 3 in
    every question. Only positions of the question and the latent loop are allowed (answers differ
    in length between problems)."""
    total, count = None, 0
    for start in range(0, len(questions), batch_size):
        batch = list(questions[start : start + batch_size])
        result, cache = model.run_codi_with_cache(batch, names_filter=hook_name, n_latents=n_latents, max_new_tokens=1)
        where = result.positions.resolve(list(positions)).to(cache[hook_name].device)
        acts = cache[hook_name]
        gathered = torch.stack([acts[i, where[i]] for i in range(len(batch))])
        batch_sum = gathered.double().sum(0)
        total = batch_sum if total is None else total + batch_sum
        count += len(batch)
    if total is None:
        raise ValueError("the reference set is empty")
    return (total / count).to(model.cfg.dtype)


# ---------------------------------------------------------------------- attention
def knockout_attention(
    model,
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
    point = "hook_attn_scores" if method == "scores" else "hook_pattern"
    if method not in ("scores", "pattern"):
        raise ValueError(f"method must be 'scores' or 'pattern', got {method!r}")
    head_index = None if heads is None else torch.tensor(list(heads))

    def hook(acts: Float[Tensor, "batch head query key"], hook) -> Tensor:
        context = model.chunk_context
        key_positions = context.layout.resolve(list(keys)).to(acts.device)  # [batch, n_keys]
        queries = context.positions.to(acts.device)  # [query]
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

    return [(f"blocks.{layer}.attn.{point}", hook) for layer in layers]


def ablate_heads(
    model,
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
    name = f"blocks.{layer}.attn.hook_z"

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
