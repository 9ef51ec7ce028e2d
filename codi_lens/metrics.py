"""Answer metrics on tensors: KL, logit difference, normalised recovery, and where "the answer" is.

"At the answer" means the position predicting the FIRST token of the answer number, teacher-forced
on the reference run's own answer tokens before it (``"The answer is: "``), not the first position
after EOT, which always predicts the same word. The answer number is the last number of the
reference answer text (upstream's rule). :func:`find_answer_number` finds that token for any
tokenizer, including ones that split a number into several tokens; :func:`logits_at_answer` runs the
latent loop (with any intervention) and returns the logits there.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from codi_lens.core.answers import NUMBER_PATTERN


# ---------------------------------------------------------------------- tensor-level
def kl_divergence(
    reference_logits: Float[Tensor, "batch d_vocab"], other_logits: Float[Tensor, "batch d_vocab"]
) -> Float[Tensor, " batch"]:
    """``KL(reference || other)`` in nats over the full vocabulary, per row (computed in float64)."""
    log_p = reference_logits.double().log_softmax(-1)
    log_q = other_logits.double().log_softmax(-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def logit_difference(
    logits: Float[Tensor, "batch d_vocab"], token_a: Int[Tensor, " batch"], token_b: Int[Tensor, " batch"]
) -> Float[Tensor, " batch"]:
    """``logit[token_a] - logit[token_b]`` per row (e.g. clean minus corrupted answer token)."""
    rows = torch.arange(logits.shape[0], device=logits.device)
    return (logits[rows, token_a.to(logits.device)] - logits[rows, token_b.to(logits.device)]).double()


def normalised_recovery(patched, corrupted, clean):
    """``(patched - corrupted) / (clean - corrupted)``, elementwise; NaN where ``clean == corrupted``.

    Accepts tensors, arrays or scalars (returns a float64 NumPy array or scalar).
    """
    patched, corrupted, clean = (np.asarray(_numpy(x), dtype=np.float64) for x in (patched, corrupted, clean))
    numerator, denominator = np.broadcast_arrays(patched - corrupted, clean - corrupted)
    out = np.divide(numerator, denominator, out=np.full(numerator.shape, np.nan), where=denominator != 0)
    return out[()]  # a scalar for scalar inputs


def _numpy(x):
    return x.detach().cpu().numpy() if isinstance(x, Tensor) else x


def classify_answer(prediction: float | None, clean_answer: float, corrupted_answer: float) -> str:
    """``"clean"``, ``"corrupted"`` or ``"other"`` (no number, or a third value)."""
    if prediction is not None and prediction == clean_answer:
        return "clean"
    if prediction is not None and prediction == corrupted_answer:
        return "corrupted"
    return "other"


# ---------------------------------------------------------------------- the answer-number position
@dataclass(frozen=True)
class AnswerNumber:
    """Where a reference answer's number starts, in its own tokens.

    Attributes:
        index: the answer token that starts the last number of the text (``answer:index``); the
            logits predicting it come from the position before (EOT for index 0).
        prefix: the answer tokens before it (``answer_tokens[:index]``), fed when teacher forcing.
        token: the number's first token id.
        text: the number as written (``"18"``).
    """

    index: int
    prefix: tuple[int, ...]
    token: int
    text: str


def find_answer_number(tokenizer, answer_tokens: Sequence[int]) -> AnswerNumber | None:
    """The first token of the last number in ``decode(answer_tokens)`` (special tokens skipped), or
    None when the text has no number.

    Works for any tokenizer by decoding growing prefixes: token ``i`` covers the characters between
    ``len(decode(tokens[:i]))`` and ``len(decode(tokens[:i + 1]))``; the number's first token is the
    one covering its first character (a leading space or a split number is handled the same way).
    """
    tokens = list(answer_tokens)
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    matches = list(NUMBER_PATTERN.finditer(text))
    if not matches:
        return None
    number = matches[-1]
    for i in range(len(tokens)):
        end = len(tokenizer.decode(tokens[: i + 1], skip_special_tokens=True))
        if end > number.start():
            return AnswerNumber(index=i, prefix=tuple(tokens[:i]), token=tokens[i], text=number.group())
    return None  # pragma: no cover - the number lies inside the decoded text


def logits_at_answer(
    model,
    questions: Sequence[str],
    numbers: Sequence[AnswerNumber],
    *,
    n_latents: int = 6,
    fwd_hooks: Sequence[tuple] = (),
) -> Float[Tensor, "batch d_vocab"]:
    """Logits predicting each reference answer's number, after the latent loop under ``fwd_hooks``.

    Teacher-forces ``number.prefix + [number.token]`` (the reference run's own tokens), and returns
    the row predicting ``number.token`` (float32, on the model's device).
    """
    scores = model.score_answers(list(questions), forced_answers(numbers), n_latents=n_latents, fwd_hooks=fwd_hooks)
    return rows_at_answer(scores.logits, numbers)


def forced_answers(numbers: Sequence[AnswerNumber]) -> list[list[int]]:
    """The answer tokens to teacher-force for each number: its prefix and its first token."""
    return [list(n.prefix) + [n.token] for n in numbers]


def rows_at_answer(
    logits: Float[Tensor, "batch answer_pos d_vocab"], numbers: Sequence[AnswerNumber]
) -> Float[Tensor, "batch d_vocab"]:
    """The row of teacher-forced answer logits predicting each number's first token (float32)."""
    rows = torch.arange(len(numbers), device=logits.device)
    index = torch.tensor([n.index for n in numbers], device=logits.device)
    return logits[rows, index].float()
