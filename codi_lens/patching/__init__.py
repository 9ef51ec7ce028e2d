"""Activation patching inside the real latent loop.

Modules in dependency order: ``kinds`` (what a sweep patches: the registry of activation kinds, spans and
the grid of sites), ``prepare`` (a batch of pairs made ready: clean runs, answer tokens, logit differences),
``exact`` (patches as branches of the corrupted run), ``routes`` (a step's content patched through the
recurrence or the attention route), ``attribution`` (every site's linear estimate from one
backward pass), ``sweep`` (the table of every site on every pair, resumable), ``trajectories`` (chained
versus parallel patching).
"""

from codi_lens.patching.attribution import rank_agreement, site_attributions
from codi_lens.patching.exact import (
    branch_metric,
    patch_hooks,
    patch_start,
    patched_logits,
    patched_metric,
    replace_question_tokens,
    run_patches,
)
from codi_lens.patching.kinds import CHANGED, PATCH_KINDS, SPAN_STARTS, span_positions, sweep_sites
from codi_lens.patching.prepare import (
    NO_COMPARED_TOKEN,
    NO_CORRUPTED_PREFERENCE,
    PairBatch,
    batch_readings,
    corrupted_number_tokens,
    from_other_problems,
    metric_value,
    number_tokens,
    prepare_pairs,
)
from codi_lens.patching.routes import (
    EVERY_LAYER,
    ROUTES,
    RoutePatch,
    Span,
    interactions,
    route_patches,
    route_rows,
    route_sweep,
)
from codi_lens.patching.sweep import DONORS, METHODS, patch_rows, patch_sweep
from codi_lens.patching.trajectories import (
    chained,
    clean_thought_activations,
    parallel,
    trajectory_rows,
    trajectory_sweep,
)

__all__ = [
    "EVERY_LAYER",
    "ROUTES",
    "RoutePatch",
    "Span",
    "branch_metric",
    "interactions",
    "route_patches",
    "route_rows",
    "route_sweep",
    "CHANGED",
    "DONORS",
    "METHODS",
    "NO_COMPARED_TOKEN",
    "NO_CORRUPTED_PREFERENCE",
    "PATCH_KINDS",
    "SPAN_STARTS",
    "PairBatch",
    "chained",
    "clean_thought_activations",
    "corrupted_number_tokens",
    "batch_readings",
    "metric_value",
    "patched_metric",
    "from_other_problems",
    "number_tokens",
    "parallel",
    "patch_hooks",
    "patch_rows",
    "patch_start",
    "patch_sweep",
    "patched_logits",
    "prepare_pairs",
    "rank_agreement",
    "replace_question_tokens",
    "run_patches",
    "site_attributions",
    "span_positions",
    "sweep_sites",
    "trajectory_rows",
    "trajectory_sweep",
]
