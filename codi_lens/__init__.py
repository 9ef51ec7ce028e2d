"""codi_lens: mechanistic interpretability for CODI (continuous chain-of-thought) models.

Load a checkpoint with :func:`load_codi` (or the shipped demo model with :func:`load_pretrained`),
then run the CODI loop with hooks: :meth:`CODIModel.run_codi`, :meth:`CODIModel.run_codi_with_cache`
and :meth:`CODIModel.score_answers`. Thought hook names come from :func:`thought_hook_name`.
"""

from codi_lens.answers import extract_prediction, parse_gold_answer
from codi_lens.checkpoint import CheckpointError
from codi_lens.hooks import (
    CODIPositions,
    PositionalHook,
    PositionContextError,
    PositionError,
    positional_hook,
    replace_at_positions,
    thought_hook_name,
    zero_at_positions,
)
from codi_lens.loading import PRETRAINED, load_codi, load_pretrained
from codi_lens.model import AnswerScores, CODIModel, CODIResult

__all__ = [
    "AnswerScores",
    "CODIModel",
    "CODIPositions",
    "CODIResult",
    "CheckpointError",
    "PRETRAINED",
    "PositionContextError",
    "PositionError",
    "PositionalHook",
    "extract_prediction",
    "load_codi",
    "load_pretrained",
    "parse_gold_answer",
    "positional_hook",
    "replace_at_positions",
    "thought_hook_name",
    "zero_at_positions",
]
