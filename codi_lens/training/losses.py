"""The CODI objective: the student's forward through the latent loop, and every loss term."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from codi_lens.training.batches import CODIBatch
from codi_lens.training.config import TrainConfig
from codi_lens.training.module import CODIModule


def _lm_step(lm, embeds, mask, positions, cache):
    return lm(
        inputs_embeds=embeds,
        attention_mask=mask,
        position_ids=positions,
        past_key_values=cache,
        use_cache=True,
        output_hidden_states=True,
    )


def latent_forward(
    lm,
    feed_back: Callable[[Float[Tensor, "batch d"]], Float[Tensor, "batch d"]],
    prompt_ids: Int[Tensor, "batch q_pos"],
    prompt_mask: Int[Tensor, "batch q_pos"],
    answer_ids: Int[Tensor, "batch a_pos"],
    answer_mask: Int[Tensor, "batch a_pos"],
    n_latents: int,
):
    """A latent loop with gradients: the left-padded prompt (ending in the marker that opens the span),
    ``n_latents`` thoughts each fed ``feed_back(h)`` of the last state before it (CODI: ``prj``; Coconut:
    the identity), then the right-padded answer chunk (starting with the marker that closes it).

    Returns ``(answer_logits [batch, a_pos, vocab], hidden_states, thought_states)``: the answer
    chunk's states, a tuple over layers (embeddings first) of ``[batch, a_pos, d]``, and the thoughts'
    states, a tuple over the same layers of ``[batch, n_latents, d]`` (thought ``j`` in column ``j-1``).
    """
    from transformers import DynamicCache

    embed = lm.get_input_embeddings()
    mask = prompt_mask
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache()
    out = _lm_step(lm, embed(prompt_ids), mask, positions, cache)
    h = out.hidden_states[-1][:, -1]
    next_pos = positions[:, -1:] + 1
    ones = torch.ones_like(next_pos)
    thought_states = []
    for _ in range(n_latents):
        mask = torch.cat([mask, ones], dim=1)
        out = _lm_step(lm, feed_back(h)[:, None], mask, next_pos, cache)
        h = out.hidden_states[-1][:, -1]
        thought_states.append(out.hidden_states)
        next_pos = next_pos + 1
    mask = torch.cat([mask, answer_mask], dim=1)
    answer_pos = next_pos + torch.arange(answer_ids.shape[1], device=next_pos.device)[None]
    out = _lm_step(lm, embed(answer_ids), mask, answer_pos, cache)
    by_layer = tuple(torch.cat(layer, dim=1) for layer in zip(*thought_states)) if thought_states else ()
    return out.logits, out.hidden_states, by_layer


def student_forward(model: CODIModule, batch: CODIBatch, n_latents: int):
    """The CODI student pass (:func:`latent_forward` through ``model.prj``): prompt, ``n_latents`` thoughts,
    then the answer chunk."""
    return latent_forward(
        model.codi, model.prj, batch.prompt_ids, batch.prompt_mask, batch.answer_ids, batch.answer_mask, n_latents
    )


def _gather(states: Float[Tensor, "batch pos d"], index: Int[Tensor, " batch"]) -> Float[Tensor, "batch d"]:
    return states[torch.arange(states.shape[0], device=states.device), index]


def distillation_loss(
    student_states: Sequence[Float[Tensor, "batch s_pos d_model"]],
    teacher_states: Sequence[Float[Tensor, "batch t_pos d_model"]],
    s_pos: Int[Tensor, " batch"],
    t_pos: Int[Tensor, " batch"],
    div_std: bool = True,
    standardise: bool = False,
) -> Float[Tensor, ""]:
    """Mean over layers of SmoothL1(student, teacher.detach()) / teacher std, at the given positions.

    ``standardise=True`` divides both states by the teacher's std *before* the SmoothL1 instead of
    dividing the loss after it. Upstream's form is scale-dependent (SmoothL1 is quadratic for small
    differences), so on a from-scratch model whose states are ~0.02 in size it is ~1e-4 and does
    nothing; the standardised form measures the gap in units of the teacher's spread at any scale.
    """
    total = 0.0
    for s, t in zip(student_states, teacher_states):
        s_sel, t_sel = _gather(s, s_pos), _gather(t, t_pos).detach()
        if standardise:
            sigma = t_sel.std().clamp_min(1e-6)
            term = F.smooth_l1_loss(s_sel / sigma, t_sel / sigma)
        else:
            term = F.smooth_l1_loss(s_sel, t_sel)
            term = term / t_sel.std() if div_std else term
        total = total + term
    return total / len(student_states)


def chain_loss(
    thought_states: Sequence[Float[Tensor, "batch n_latents d_model"]],
    teacher_states: Sequence[Float[Tensor, "batch t_pos d_model"]],
    result_pos: Int[Tensor, "batch n_results"],
) -> Float[Tensor, ""]:
    """Mean over layers (embeddings excluded) of SmoothL1 between thought ``j``'s states and the
    teacher's (detached) states at the position that predicts its result ``j`` (``result_pos``, see
    :func:`result_positions`), both divided by the teacher's std.

    Pairs exist for ``j <= min(n_results, n_latents)``; a thought past a problem's last result is left
    free. The embedding layer is left out: it would pull every fed-back thought toward the embedding
    of the token before a result. The standardised form is used because the from-scratch model's
    states are small (see :func:`distillation_loss`).
    """
    n = min(result_pos.shape[1], thought_states[0].shape[1])
    rows, steps = torch.nonzero(result_pos[:, :n] >= 0, as_tuple=True)
    if rows.numel() == 0:
        return thought_states[0].sum() * 0.0
    cols = result_pos[rows, steps]
    total = 0.0
    for s, t in zip(thought_states[1:], teacher_states[1:]):
        target = t[rows, cols].detach()
        sigma = target.std().clamp_min(1e-6)
        total = total + F.smooth_l1_loss(s[rows, steps] / sigma, target / sigma)
    return total / (len(thought_states) - 1)


def chain_logit_loss(
    thought_logits: Float[Tensor, "batch n_latents vocab"],
    teacher_logits: Float[Tensor, "batch t_pos vocab"],
    result_pos: Int[Tensor, "batch n_results"],
) -> Float[Tensor, ""]:
    """Mean over (problem, thought) pairs of KL(teacher || thought): the teacher's (detached)
    next-token distribution at the position that predicts its result ``j`` against thought ``j``'s.

    Pairs as in :func:`chain_loss` (``result_pos`` column ``j-1`` for thought ``j``, -1: no pair).
    """
    n = min(result_pos.shape[1], thought_logits.shape[1])
    rows, steps = torch.nonzero(result_pos[:, :n] >= 0, as_tuple=True)
    if rows.numel() == 0:
        return thought_logits.sum() * 0.0
    target = F.log_softmax(teacher_logits[rows, result_pos[rows, steps]].detach().float(), dim=-1)
    student = F.log_softmax(thought_logits[rows, steps].float(), dim=-1)
    return F.kl_div(student, target, log_target=True, reduction="batchmean")


def chain_targets(
    result_pos: Int[Tensor, "batch n_results"], answer_pos: Int[Tensor, " batch"], n_latents: int, carry_answer: bool
) -> Int[Tensor, "batch n_latents"]:
    """The teacher position each thought is distilled toward: result ``j``'s for thought ``j``; past a
    problem's last result, the position that predicts the answer number (``carry_answer``) or -1."""
    targets = torch.full((result_pos.shape[0], n_latents), -1, dtype=result_pos.dtype, device=result_pos.device)
    n = min(n_latents, result_pos.shape[1])
    targets[:, :n] = result_pos[:, :n]
    if carry_answer:
        targets = torch.where(targets < 0, answer_pos[:, None].to(targets.dtype), targets)
    return targets


def codi_losses(model: CODIModule, batch: CODIBatch, cfg: TrainConfig) -> dict[str, Float[Tensor, ""]]:
    """The three CODI losses and their weighted sum (``loss``)."""
    logits, s_states, thought_states = student_forward(model, batch, cfg.n_latents)
    ce_student = F.cross_entropy(logits.flatten(0, 1).float(), batch.answer_labels.flatten(), ignore_index=-100)
    losses = {"ce_student": ce_student}
    if cfg.use_teacher:
        t_out = model.codi(input_ids=batch.teacher_ids, attention_mask=batch.teacher_mask, output_hidden_states=True)
        t_logits = t_out.logits[:, :-1].flatten(0, 1).float()
        losses["ce_teacher"] = F.cross_entropy(t_logits, batch.teacher_labels[:, 1:].flatten(), ignore_index=-100)
        losses["distill"] = distillation_loss(
            s_states,
            t_out.hidden_states,
            batch.student_distill_pos,
            batch.teacher_distill_pos,
            cfg.distill_div_std,
            cfg.distill_standardise,
        )
        losses["loss"] = (
            cfg.student_weight * ce_student
            + cfg.distill_weight * losses["distill"]
            + cfg.teacher_weight * losses["ce_teacher"]
        )
        if (cfg.chain_distill_weight or cfg.chain_logit_weight) and cfg.n_latents:
            targets = chain_targets(
                batch.teacher_result_pos, batch.teacher_distill_pos, cfg.n_latents, cfg.chain_carry_answer
            )
        if cfg.chain_distill_weight and cfg.n_latents:
            losses["chain"] = chain_loss(thought_states, t_out.hidden_states, targets)
            losses["loss"] = losses["loss"] + cfg.chain_distill_weight * losses["chain"]
        if cfg.chain_logit_weight and cfg.n_latents:
            thought_logits = model.codi.get_output_embeddings()(thought_states[-1])
            losses["chain_logits"] = chain_logit_loss(thought_logits, t_out.logits, targets)
            losses["loss"] = losses["loss"] + cfg.chain_logit_weight * losses["chain_logits"]
    else:
        losses["loss"] = cfg.student_weight * ce_student
    return losses
