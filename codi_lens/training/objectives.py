"""What a training method gives the :class:`~codi_lens.training.trainer.Trainer`: its batches, its losses, its
curriculum stages and how it is validated (:data:`OBJECTIVES`, chosen by ``TrainConfig.method``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from codi_lens.core.registry import Registry
from codi_lens.data.problems import Problem
from codi_lens.training.batches import make_batch
from codi_lens.training.coconut import coconut_losses, coconut_stage, make_coconut_batch
from codi_lens.training.config import TrainConfig
from codi_lens.training.losses import codi_losses


@dataclass(frozen=True)
class Objective:
    """A training method.

    Attributes:
        batch: ``(problems, tokenizer, base_vocab, cfg, stage) -> batch``.
        losses: ``(module, batch, cfg) -> {"loss": ..., ...}``.
        stage: ``(step, cfg) -> int``, the curriculum stage of a 0-based step; the optimizer's moments are
            cleared when it changes.
        validation: ``(stage, cfg) -> (n_latents, max_new_tokens)`` of the greedy validation runs.
    """

    batch: Callable[[list[Problem], Any, int, TrainConfig, int], Any]
    losses: Callable[[Any, Any, TrainConfig], dict]
    stage: Callable[[int, TrainConfig], int]
    validation: Callable[[int, TrainConfig], tuple[int, int]]


OBJECTIVES: Registry[Objective] = Registry("training method")
OBJECTIVES.add(
    "codi",
    Objective(
        batch=lambda problems, tokenizer, base_vocab, cfg, stage: make_batch(
            problems, tokenizer, base_vocab, cfg.drop_last_cot_step, cfg.cot_text
        ),
        losses=codi_losses,
        stage=lambda step, cfg: 0,
        validation=lambda stage, cfg: (cfg.n_latents, 12),
    ),
)
OBJECTIVES.add(
    "coconut",
    Objective(
        batch=make_coconut_batch,
        losses=coconut_losses,
        stage=coconut_stage,
        # Steps not yet replaced are written before the answer, so the budget covers a whole chain.
        validation=lambda stage, cfg: (stage * cfg.thoughts_per_step, 96),
    ),
)
