"""What a run of the CODI loop returns: generated answers (:class:`CODIResult`), teacher-forced answer scores
(:class:`AnswerScores`) and the latent loop alone (:class:`LatentRun`)."""

from __future__ import annotations

from dataclasses import dataclass

from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import ActivationCache

from codi_lens.core.positions import CODIPositions


@dataclass
class CODIResult:
    """Output of :meth:`CODIModel.run_codi`.

    Attributes:
        latent_states: ``[batch, n_latents + 1, d_model]``: ``h_0`` (at BOT) .. ``h_n``, post-final-norm
            hidden states including the norm's gain: exactly what the projection consumed.
        thought_embeds: ``[batch, n_latents, d_model]``: the embeddings fed at thoughts 1..n.
        answer_tokens: generated token ids per example (including the EOS that stopped it).
        answer_text: decoded with special tokens skipped.
        prediction: the last number in ``answer_text`` (upstream's rule), or None.
        positions: the position map (see :class:`CODIPositions`).
        step_logits: if requested, ``[batch, n_latents + 2 + max_answer_len - 1, d_vocab]``: the
            logits output at BOT, each thought, EOT and each fed answer token, in order.
    """

    latent_states: Float[Tensor, "batch n_latents_plus_1 d_model"]
    thought_embeds: Float[Tensor, "batch n_latents d_model"]
    answer_tokens: list[list[int]]
    answer_text: list[str]
    prediction: list[float | None]
    positions: CODIPositions
    step_logits: Float[Tensor, "batch n_steps d_vocab"] | None = None


@dataclass
class AnswerScores:
    """Teacher-forced answer logits from :meth:`CODIModel.score_answers`.

    Attributes:
        logits: ``[batch, max_answer_len, d_vocab]``: row j is the distribution predicting answer
            token j (row 0 is the output at EOT). Rows past an example's answer length are padding.
        answer_tokens: ``[batch, max_answer_len]`` token ids, right-padded with the pad id.
        answer_mask: ``[batch, max_answer_len]``, 1 where a real answer token is.
        latent_states, thought_embeds, positions: as in :class:`CODIResult`.
    """

    logits: Float[Tensor, "batch answer_pos d_vocab"]
    answer_tokens: Int[Tensor, "batch answer_pos"]
    answer_mask: Int[Tensor, "batch answer_pos"]
    latent_states: Float[Tensor, "batch n_latents_plus_1 d_model"]
    thought_embeds: Float[Tensor, "batch n_latents d_model"]
    positions: CODIPositions

    def log_probs_of_answers(self) -> Float[Tensor, "batch answer_pos"]:
        """Log-probability of each teacher-forced answer token (0 at padding)."""
        logp = self.logits.float().log_softmax(-1).gather(-1, self.answer_tokens[..., None])[..., 0]
        return logp * self.answer_mask


@dataclass
class LatentRun:
    """Output of :meth:`CODIModel.run_latents`: the loop up to the last thought, no answer.

    Attributes:
        latent_states: ``[batch, n_latents + 1, d_model]``: ``h_0 .. h_n`` (as in :class:`CODIResult`).
        thought_embeds: ``[batch, n_latents, d_model]``: the embeddings fed at thoughts 1..n.
        positions: the position map (question, BOT and thoughts; no EOT or answer was fed).
        cache: with ``names_filter``, the activations of the question, BOT and thoughts (as
            :meth:`CODIModel.run_codi_with_cache` records them); else None.
    """

    latent_states: Float[Tensor, "batch n_latents_plus_1 d_model"]
    thought_embeds: Float[Tensor, "batch n_latents d_model"]
    positions: CODIPositions
    cache: ActivationCache | None = None
