"""The interventions and scopes a sweep applies by name (``--interventions zero,mean``, ``--scopes single,all``).

A sweep (step importance) builds, for each problem batch, what the interventions draw on
(:class:`AblationInputs`: the baseline's own thoughts, each problem's donor's, reference means, noise
seeds), and asks the registry for the hooks of an intervention on a set of thoughts. Adding an intervention
to every sweep, its command-line choices, validation and ``--help`` is one entry in :data:`INTERVENTIONS`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from itertools import combinations
from typing import Literal

import torch
from jaxtyping import Float
from torch import Tensor

from codi_lens.core.hooks import HasChunkScope, Hooks
from codi_lens.core.registry import Registry
from codi_lens.interventions.steps import StepSite
from codi_lens.interventions.thoughts import derangement, gaussian_noise_like

#: The name of a scope (see :data:`SCOPES`).
Scope = Literal["single", "cumulative", "all", "pairs", "triples"]


@dataclass(frozen=True)
class ThoughtScope:
    """Which thoughts (1-based) a scope ending at thought k covers in a run of n thoughts. A scope that
    ``spans_all`` ignores k (its rows carry ``thought`` 0). A scope of ``set_size`` > 0 is not indexed by one k:
    its conditions are every set of that many distinct thoughts (rows carry the set's last thought and the set
    in ``thoughts``)."""

    thoughts: Callable[[int, int], list[int]] | None
    spans_all: bool = False
    set_size: int = 0

    def sets(self, n_latents: int) -> list[tuple[int, tuple[int, ...]]]:
        """Every condition of the scope in a run of ``n_latents`` thoughts: ``(thought, thoughts acted on)``."""
        if self.set_size:
            return [(ks[-1], ks) for ks in combinations(range(1, n_latents + 1), self.set_size)]
        ks = [0] if self.spans_all else range(1, n_latents + 1)
        return [(k, tuple(self.thoughts(k, n_latents))) for k in ks]


SCOPES: Registry[ThoughtScope] = Registry("scope")
SCOPES.add("single", ThoughtScope(lambda k, n: [k]))
SCOPES.add("cumulative", ThoughtScope(lambda k, n: list(range(1, k + 1))))
SCOPES.add("all", ThoughtScope(lambda k, n: list(range(1, n + 1)), spans_all=True))
SCOPES.add("pairs", ThoughtScope(None, set_size=2))
SCOPES.add("triples", ThoughtScope(None, set_size=3))
#: The scopes a sweep runs unless told otherwise (sets of thoughts are asked for by name).
DEFAULT_SCOPES = ("single", "cumulative", "all")


def thought_scope(scope: str, k: int, n_latents: int) -> list[int]:
    """The thoughts (1-based) a scope covers: ``single`` = [k], ``cumulative`` = 1..k, ``all`` = 1..n
    (``k`` is ignored for ``all``). Scopes of sets (``pairs``, ``triples``) have no single k: see
    :meth:`ThoughtScope.sets`."""
    rule = SCOPES[scope]
    if rule.set_size:
        raise ValueError(f"scope {scope!r} is every set of {rule.set_size} thoughts, not one thought k")
    if not rule.spans_all and not 1 <= k <= n_latents:
        raise ValueError(f"thought {k} is outside 1..{n_latents}")
    return rule.thoughts(k, n_latents)


@dataclass
class AblationInputs:
    """What the interventions of one batch draw on.

    Attributes:
        baseline_thoughts: the batch's own fed thoughts ``[batch, n_latents, d_model]`` (for shuffle).
        donor_thoughts: each problem's donor's fed thoughts ``[batch, n_latents, d_model]`` (for swap).
        means: reference mean thoughts ``[n_latents, d_model]`` (for mean), or None.
        seeds: one noise seed per problem.
        seed: the run's seed (the shuffle permutation).
        draws: for draw d >= 1 of a resampled intervention (several donors or noise seeds per problem), the
            donors' thoughts and the seeds of that draw (``draws[d - 1]``); draw 0 is the fields above.
        site: where the interventions act (default: the fed thought); the baseline's, the donors' and the mean
            values above are then read at that site (``[..., n_latents, *rest]``).
        model: the model the hooks are built for (needed at a site other than the fed thought).
    """

    baseline_thoughts: Float[Tensor, "batch n_latents d_model"]
    donor_thoughts: Float[Tensor, "batch n_latents d_model"] | None
    means: Float[Tensor, "n_latents d_model"] | None
    seeds: list[int]
    seed: int
    draws: list[tuple[Float[Tensor, "batch n_latents d_model"] | None, list[int]]] = field(default_factory=list)
    site: StepSite = field(default_factory=StepSite)
    model: HasChunkScope | None = None

    def drawn(self, draw: int) -> AblationInputs:
        """The inputs of draw ``draw`` (0: these): another donor per problem and other noise seeds."""
        if draw == 0:
            return self
        if draw > len(self.draws):
            raise ValueError(f"draw {draw} was not prepared ({len(self.draws) + 1} draws)")
        donors, seeds = self.draws[draw - 1]
        return replace(self, donor_thoughts=donors, seeds=seeds, draws=[])


@dataclass(frozen=True)
class ThoughtIntervention:
    """An intervention on fed thoughts that sweeps apply by name.

    Attributes:
        build: ``(thoughts, inputs) -> fwd_hooks`` changing the given thoughts (1-based) of a batch.
        description: one line for ``--help`` and the docs.
        min_thoughts: the fewest thoughts it can act on (a shuffle needs two); smaller scopes are skipped.
        needs_means: it feeds reference mean thoughts (computed once per sweep).
        needs_donors: it feeds another problem's thoughts (a sweep needs two problems or more).
        resampled: it draws at random (a donor, a noise seed), so a sweep may repeat it with several draws.
    """

    build: Callable[[list[int], AblationInputs], Hooks]
    description: str
    min_thoughts: int = 1
    needs_means: bool = False
    needs_donors: bool = False
    resampled: bool = False


def _means(inputs: AblationInputs) -> Float[Tensor, "n_latents d_model"]:
    if inputs.means is None:
        raise ValueError("the mean intervention needs reference means")
    return inputs.means


def _donors(inputs: AblationInputs) -> Float[Tensor, "batch n_latents d_model"]:
    if inputs.donor_thoughts is None:
        raise ValueError("the swap intervention needs donor thoughts")
    return inputs.donor_thoughts


def _zero(ks: list[int], inputs: AblationInputs) -> Hooks:
    return inputs.site.transform(inputs.model, ks, lambda acts, k: torch.zeros_like(acts))


def _mean(ks: list[int], inputs: AblationInputs) -> Hooks:
    means = _means(inputs)
    return inputs.site.replace(inputs.model, {k: means[k - 1] for k in ks})


def _noise(ks: list[int], inputs: AblationInputs) -> Hooks:
    """Gaussian noise of the activation's norm; row i of thought k uses seed ``seeds[i] + k``."""
    seeds = inputs.seeds
    return inputs.site.transform(
        inputs.model, ks, lambda acts, k: acts + gaussian_noise_like(acts, [s + k for s in seeds])
    )


def _swap(ks: list[int], inputs: AblationInputs) -> Hooks:
    donors = _donors(inputs)
    return inputs.site.replace(inputs.model, {k: donors[:, k - 1] for k in ks})


def _shuffle(ks: list[int], inputs: AblationInputs) -> Hooks:
    order = derangement(len(ks), seed=inputs.seed)
    own = inputs.baseline_thoughts
    return inputs.site.replace(inputs.model, {k: own[:, ks[j] - 1] for k, j in zip(ks, order)})


INTERVENTIONS: Registry[ThoughtIntervention] = Registry("intervention")
INTERVENTIONS.add("zero", ThoughtIntervention(_zero, "a zero vector"))
INTERVENTIONS.add(
    "mean",
    ThoughtIntervention(_mean, "the mean thought at that step over a reference set of problems", needs_means=True),
)
INTERVENTIONS.add(
    "noise",
    ThoughtIntervention(
        _noise, "the thought plus Gaussian noise of the thought's norm (seeded per problem)", resampled=True
    ),
)
INTERVENTIONS.add(
    "swap",
    ThoughtIntervention(
        _swap,
        "the thought of another problem (the next one in the problem list) at that step",
        needs_donors=True,
        resampled=True,
    ),
)
INTERVENTIONS.add(
    "shuffle",
    ThoughtIntervention(_shuffle, "the baseline's own thoughts in a seeded shuffled order", min_thoughts=2),
)
