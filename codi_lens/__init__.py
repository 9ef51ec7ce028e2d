"""codi_lens: mechanistic interpretability for CODI (continuous chain-of-thought) models.

Load a checkpoint with :func:`load_codi` (or the shipped demo model with :func:`load_pretrained`),
then run the CODI loop with hooks: :meth:`CODIModel.run_codi`, :meth:`CODIModel.run_codi_with_cache`,
:meth:`CODIModel.score_answers` and :meth:`CODIModel.run_latents`. Thought hook names come from
:func:`thought_hook_name`.

The package is layered; a lower layer never imports a higher one (``tests/test_architecture.py`` checks):

1. ``core``: the model, its latent loop, named positions, hook names and hooks, sites, branching, gradients;
2. ``loading``: checkpoints, base architectures, tokenizers, the shipped models and datasets;
3. ``data``: problems, their sources, the synthetic generator, clean/corrupted pairs;
4. ``run``: the result store, executors (local, Ray) and the command-line plumbing;
5. ``metrics`` (tensor metrics at the answer) and ``stats`` (bootstrap CIs);
6. ``interventions``;
7. ``patching``, ``saes`` and the analysis modules (``accuracy``, ``importance``, ``attention``, ``lens``,
   ``probes``, ``early_answers``, ``value_patching``, ``activations``, ``features``, ``pathways``,
   ``training``);
8. ``plotting``; 9. ``reports``. The ``experiments`` are thin commands above everything.
"""

from codi_lens.core.answers import extract_prediction, parse_gold_answer
from codi_lens.core.errors import CodiLensError, PositionContextError, PositionError
from codi_lens.core.hooks import PositionalHook, positional_hook, replace_at_positions, zero_at_positions
from codi_lens.core.model import CODIModel
from codi_lens.core.names import thought_hook_name
from codi_lens.core.positions import CODIPositions
from codi_lens.core.results import AnswerScores, CODIResult, LatentRun
from codi_lens.core.sites import Site
from codi_lens.loading import PRETRAINED, load_codi, load_pretrained
from codi_lens.loading.checkpoint import CheckpointError

__all__ = [
    "AnswerScores",
    "CODIModel",
    "CODIPositions",
    "CODIResult",
    "CheckpointError",
    "CodiLensError",
    "LatentRun",
    "PRETRAINED",
    "PositionContextError",
    "PositionError",
    "PositionalHook",
    "Site",
    "extract_prediction",
    "load_codi",
    "load_pretrained",
    "parse_gold_answer",
    "positional_hook",
    "replace_at_positions",
    "thought_hook_name",
    "zero_at_positions",
]
