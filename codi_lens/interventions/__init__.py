"""Interventions inside the CODI loop, each a list of ``(hook_name, fn)`` pairs for the ``fwd_hooks`` of
``run_codi``, ``run_codi_with_cache``, ``score_answers`` and ``run_latents``. Lists compose by concatenation
(:func:`compose`); hooks on one hook point run in the order given.

Three families, a module each: on the fed-back thought (:mod:`~codi_lens.interventions.thoughts`), on any
activation at named positions (:mod:`~codi_lens.interventions.positions`), on attention
(:mod:`~codi_lens.interventions.attention`); and the registry of those a sweep applies by name
(:mod:`~codi_lens.interventions.registry`). A thought or position the run does not reach is refused by the
run with a :class:`~codi_lens.core.errors.PositionError` naming its range, before anything runs.
"""

from codi_lens.core.hooks import Hooks, compose
from codi_lens.interventions.attention import ablate_heads, knockout_attention
from codi_lens.interventions.positions import (
    mean_activation,
    mean_at,
    mean_difference,
    noise_at,
    random_direction,
    replace_at,
    steer,
    zero_at,
)
from codi_lens.interventions.registry import (
    DEFAULT_SCOPES,
    INTERVENTIONS,
    SCOPES,
    AblationInputs,
    Scope,
    thought_scope,
)
from codi_lens.interventions.thoughts import (
    gaussian_noise_like,
    mean_thought_embeds,
    mean_thoughts,
    noise_thoughts,
    replace_thoughts,
    shuffle_thoughts,
    swap_thoughts,
    zero_thoughts,
)

__all__ = [
    "DEFAULT_SCOPES",
    "INTERVENTIONS",
    "SCOPES",
    "AblationInputs",
    "Hooks",
    "Scope",
    "ablate_heads",
    "compose",
    "gaussian_noise_like",
    "knockout_attention",
    "mean_activation",
    "mean_at",
    "mean_difference",
    "mean_thought_embeds",
    "mean_thoughts",
    "noise_at",
    "noise_thoughts",
    "random_direction",
    "replace_at",
    "replace_thoughts",
    "shuffle_thoughts",
    "steer",
    "swap_thoughts",
    "thought_scope",
    "zero_at",
    "zero_thoughts",
]
