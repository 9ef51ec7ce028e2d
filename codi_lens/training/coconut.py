"""Coconut training (Hao et al. 2024, facebookresearch/coconut) of the same small LMs codi_lens trains CODI on.

Coconut has no projection head and no teacher: the LM alone is trained through a curriculum. At stage ``s``
a problem is written ``question, <|start-latent|>, s * c latents, <|end-latent|>``, then its chain without
the first ``s`` steps, then ``### N`` and EOS, with cross-entropy on what follows ``<|end-latent|>`` only.
Each latent is fed the last hidden state of the position before it (gradients flow through the whole
loop). At the last stage (``s = n_latents / c``) every step is replaced, as upstream's
``pad_latent_to_max`` does: each problem gets all ``n_latents`` latents whatever its length. Upstream
starts a new optimizer at each stage (``reset_optimizer``); :class:`~codi_lens.training.trainer.Trainer`
clears the optimizer's moments there.

The module keeps upstream's layout (``base_causallm`` and its input embeddings again as ``embedding``),
so its state dict is the file upstream's ``run.py`` saves, which :func:`codi_lens.load_codi` reads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn

from codi_lens.core.latent_loop import COCONUT_LOOP
from codi_lens.core.padding import pad_rows
from codi_lens.data.problems import Problem
from codi_lens.training.batches import CALC_SPAN, teacher_chain
from codi_lens.training.config import TrainConfig
from codi_lens.training.losses import latent_forward

#: Symbols Coconut's answer (``### N``) needs beyond a toy vocabulary.
ANSWER_SYMBOLS = ("#",)


class CoconutModule(nn.Module):
    """Upstream's ``Coconut`` module: ``base_causallm`` (vocabulary V + 3: ``<|start-latent|>``,
    ``<|end-latent|>``, ``<|latent|>``) and ``embedding``, its input embeddings registered a second time."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.base_causallm = lm
        self.embedding = lm.get_input_embeddings()

    @property
    def base_lm(self) -> nn.Module:
        return self.base_causallm


@dataclass
class CoconutBatch:
    """One stage's batch: the prompt (question + ``<|start-latent|>``, left-padded), how many latents follow,
    and the chunk after them (``<|end-latent|>``, the chain's remaining steps, the answer; right-padded) with
    its next-token labels."""

    prompt_ids: Int[Tensor, "batch q_pos"]
    prompt_mask: Int[Tensor, "batch q_pos"]
    answer_ids: Int[Tensor, "batch a_pos"]
    answer_mask: Int[Tensor, "batch a_pos"]
    answer_labels: Int[Tensor, "batch a_pos"]
    n_latents: int


def chain_steps(problem: Problem, cot_text: str = "equations") -> list[str]:
    """The teacher's chain (:func:`~codi_lens.training.batches.teacher_chain`, every step kept) cut into its
    steps: each ends with its ``<<...>>`` span (words before a span belong to its step; text after the last
    span joins the last step)."""
    text, _ = teacher_chain(problem, drop_last_cot_step=False, cot_text=cot_text)
    ends = [m.end() for m in CALC_SPAN.finditer(text)]
    if not ends:
        return [text] if text.strip() else []
    ends[-1] = len(text)
    starts = [0, *ends[:-1]]
    return [text[a:b].strip() for a, b in zip(starts, ends)]


def last_stage(cfg: TrainConfig) -> int:
    """The stage at which every step is replaced: ``n_latents / thoughts_per_step``."""
    if cfg.n_latents % cfg.thoughts_per_step:
        raise ValueError(f"n_latents {cfg.n_latents} is not a multiple of thoughts_per_step {cfg.thoughts_per_step}")
    return cfg.n_latents // cfg.thoughts_per_step


def coconut_stage(step: int, cfg: TrainConfig) -> int:
    """The curriculum stage of optimizer step ``step`` (0-based): ``step // stage_steps``, at most the last."""
    if cfg.stage_steps < 1:
        raise ValueError("Coconut training needs stage_steps >= 1 (optimizer steps per curriculum stage)")
    return min(step // cfg.stage_steps, last_stage(cfg))


def make_coconut_batch(
    problems: list[Problem], tokenizer, base_vocab: int, cfg: TrainConfig, stage: int
) -> CoconutBatch:
    """Problems written for curriculum stage ``stage`` (see the module docstring); pad is EOS, as upstream."""
    start, end, eos = base_vocab, base_vocab + 1, tokenizer.eos_token_id
    final = stage >= last_stage(cfg)
    enc = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    prompts, chunks, labels = [], [], []
    for p in problems:
        question = tokenizer(COCONUT_LOOP.question_text(p.question))["input_ids"]
        remaining = [] if final else chain_steps(p, cfg.cot_text)[stage:]
        written = enc(" ".join(remaining)) if remaining else []
        target = written + enc(COCONUT_LOOP.answer_text(p.answer_value)) + [eos]
        prompts.append(question + [start])
        chunks.append([end] + target[:-1])
        labels.append(target)
    prompt_ids, prompt_mask = pad_rows(prompts, eos, side="left")
    answer_ids, answer_mask = pad_rows(chunks, eos, side="right")
    answer_labels, _ = pad_rows(labels, -100, side="right")
    return CoconutBatch(prompt_ids, prompt_mask, answer_ids, answer_mask, answer_labels, stage * cfg.thoughts_per_step)


def coconut_losses(model: CoconutModule, batch: CoconutBatch, cfg: TrainConfig) -> dict[str, Float[Tensor, ""]]:
    """Cross-entropy on the chunk after the latents (Coconut's only loss)."""
    logits, _, _ = latent_forward(
        model.base_causallm,
        lambda h: h,
        batch.prompt_ids,
        batch.prompt_mask,
        batch.answer_ids,
        batch.answer_mask,
        batch.n_latents,
    )
    ce = F.cross_entropy(logits.flatten(0, 1).float(), batch.answer_labels.flatten(), ignore_index=-100)
    return {"ce": ce, "loss": ce}
