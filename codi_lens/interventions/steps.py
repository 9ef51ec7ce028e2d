"""Where an intervention on the latent steps acts: the fed thought itself, or any activation with a position axis
read at thought k (past work's "L8" setting: the residual stream after layer 8 at thought k).

A :class:`StepSite` turns "write these values at thoughts ks" and "transform the activation at thoughts ks" into
hooks for either place, so every intervention of :mod:`codi_lens.interventions.registry` (zero, mean, noise, swap,
shuffle) acts at any site without a second implementation.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from codi_lens.core.hooks import HasChunkScope, Hooks, PositionalHook
from codi_lens.core.names import parse_act_name, position_axis, thought_hook_name
from codi_lens.interventions.thoughts import replace_thoughts

#: ``fn(activation at thought k [batch, *rest], k) -> new activation``.
StepTransform = Callable[[Tensor, int], Tensor]


@dataclass(frozen=True)
class StepSite:
    """The fed thought (``hook`` None: ``thought.k.hook_input``) or a hook with a position axis (for instance
    ``blocks.8.hook_resid_post``) read at thought k."""

    hook: str | None = None

    def __post_init__(self) -> None:
        if self.hook is not None and (parse_act_name(self.hook) is None or position_axis(self.hook) != 1):
            raise ValueError(
                f"a step site is a block's activation with a position axis, e.g. blocks.8.hook_resid_post, not "
                f"{self.hook!r}"
            )

    @property
    def name(self) -> str:
        return "thought_input" if self.hook is None else self.hook

    def replace(self, model: HasChunkScope | None, values: Mapping[int, Float[Tensor, "batch ..."]]) -> Hooks:
        """Write ``values[k]`` (``[batch, *rest]`` or ``[*rest]``) at thought k."""
        if self.hook is None:
            return replace_thoughts(values)
        ks = list(values)
        return self.transform(model, ks, lambda acts, k: values[k].to(acts).expand_as(acts).clone())

    def transform(self, model: HasChunkScope | None, thoughts: Sequence[int], fn: StepTransform) -> Hooks:
        """Replace the activation at each thought k of ``thoughts`` by ``fn(activation, k)``."""
        thoughts = list(thoughts)
        if self.hook is None:
            return [(thought_hook_name(k, "input"), _at_thought(fn, k)) for k in thoughts]

        def transform(acts: Tensor, hook, which: Tensor) -> Tensor:
            return torch.stack([fn(acts[:, j], thoughts[int(w)]) for j, w in enumerate(which.tolist())], dim=1)

        if model is None:
            raise ValueError(f"an intervention at {self.hook} needs the model (its hooks act at named positions)")
        return [(self.hook, PositionalHook(model, [f"thought:{k}" for k in thoughts], transform))]


def _at_thought(fn: StepTransform, k: int):
    return lambda z, hook: fn(z, k)
