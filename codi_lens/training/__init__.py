"""CODI training (Shen et al. 2025) for any HF causal LM, LoRA optional; Coconut's curriculum beside it.

One model plays both roles:

- **teacher**: ``[question, CoT, "The answer is: N", eos]`` with cross-entropy on CoT + answer;
- **student**: ``[question, BOT] + n latents + [EOT, "The answer is: N", eos]`` with cross-entropy on
  the answer part; latents are ``z_{k+1} = prj(h_k)`` fed back as input embeddings (gradients flow
  through the whole loop);
- **distillation**: SmoothL1 between the student's and the (detached) teacher's hidden states of every
  layer at the token just before the answer number, each divided by the teacher's std, averaged over
  layers.

``loss = w_student * CE_student + beta * distill + w_teacher * CE_teacher``, plus, when
``chain_distill_weight`` is set (not upstream), ``chain_distill_weight * chain``: thought ``j``'s states
pulled toward the teacher's at the position that predicts its ``j``-th intermediate result
(:func:`chain_loss`). Training runs a fixed
step budget with a seeded data order, so a run reproduces; :class:`Trainer` checkpoints model,
optimiser, scheduler and step, and resumes identically. The model is kept in upstream's module layout
(``codi`` + ``prj``) so :func:`export_codi` writes the upstream on-disk format.

Coconut's curriculum (``TrainConfig.method = "coconut"``, :mod:`codi_lens.training.coconut`) trains the same LMs
the other way: no head, no teacher, the chain's steps replaced by latents stage by stage.

Modules in dependency order: ``config`` (:class:`TrainConfig`), ``module`` (the model in upstream's layout),
``batches``, ``losses``, ``coconut`` (Coconut's module, batches and loss), ``objectives`` (each method's batches,
losses, stages and validation), ``export``, ``trainer``, ``recipes`` (the shipped toy models').
"""

from codi_lens.training.batches import CODIBatch, make_batch, result_positions, teacher_chain
from codi_lens.training.config import BOOKKEEPING_FIELDS, TrainConfig
from codi_lens.training.export import export_codi, to_codi_model
from codi_lens.training.losses import chain_logit_loss, chain_loss, chain_targets, codi_losses, distillation_loss
from codi_lens.training.module import (
    NUMBER_PERIODS,
    CODIModule,
    add_codi_tokens,
    build_llama_lm,
    fourier_number_embeddings,
)
from codi_lens.training.recipes import DEFAULT_RECIPE, MODEL_SHAPE, RECIPES, Recipe, run_data, train_toy_model
from codi_lens.training.trainer import Trainer

__all__ = [
    "BOOKKEEPING_FIELDS",
    "DEFAULT_RECIPE",
    "MODEL_SHAPE",
    "NUMBER_PERIODS",
    "RECIPES",
    "CODIBatch",
    "CODIModule",
    "Recipe",
    "TrainConfig",
    "Trainer",
    "add_codi_tokens",
    "build_llama_lm",
    "chain_logit_loss",
    "chain_loss",
    "chain_targets",
    "codi_losses",
    "distillation_loss",
    "export_codi",
    "fourier_number_embeddings",
    "make_batch",
    "result_positions",
    "run_data",
    "teacher_chain",
    "to_codi_model",
    "train_toy_model",
]
