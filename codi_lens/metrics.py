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
from jaxtyping import Bool, Float, Int
from torch import Tensor

from codi_lens.core.answers import ANSWER_METRICS, DEFAULT_ANSWER_METRIC, NUMBER_PATTERN  # noqa: F401 (the metric names)


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
        tokens: every token that spells the number (``tokens[0] == token``; Llama 3 writes ``1200`` as
            ``120``, ``0``); ``(token,)`` when only the first is known.
    """

    index: int
    prefix: tuple[int, ...]
    token: int
    text: str
    tokens: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not self.tokens:
            object.__setattr__(self, "tokens", (self.token,))
        if self.tokens[0] != self.token:
            raise ValueError(f"the number's tokens {self.tokens} do not start with its first token {self.token}")


def find_answer_number(tokenizer, answer_tokens: Sequence[int]) -> AnswerNumber | None:
    """The first token of the last number in ``decode(answer_tokens)`` (special tokens skipped), or
    None when the text has no number.

    Works for any tokenizer by decoding growing prefixes: token ``i`` covers the characters between
    ``len(decode(tokens[:i]))`` and ``len(decode(tokens[:i + 1]))``; the number's first token is the
    one covering its first character (a leading space or a split number is handled the same way), and
    its tokens run to the one covering its last character.
    """
    tokens = list(answer_tokens)
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    matches = list(NUMBER_PATTERN.finditer(text))
    if not matches:
        return None
    number = matches[-1]
    ends = [len(tokenizer.decode(tokens[: i + 1], skip_special_tokens=True)) for i in range(len(tokens))]
    first = next(i for i, end in enumerate(ends) if end > number.start())
    last = next(i for i, end in enumerate(ends) if end >= number.end())
    spelled = tuple(tokens[first : last + 1])
    return AnswerNumber(
        index=first, prefix=tuple(tokens[:first]), token=tokens[first], text=number.group(), tokens=spelled
    )


def gold_number(tokenizer, answer_tokens: Sequence[int], gold: float) -> AnswerNumber | None:
    """The model's own answer with its last number replaced by ``gold``, as the tokenizer spells the new text:
    what to teacher-force to score the gold answer in the model's own words (``"The answer is : 7"`` ->
    ``"The answer is : 12"``). None when the answer has no number to replace."""
    text = tokenizer.decode(list(answer_tokens), skip_special_tokens=True)
    matches = list(NUMBER_PATTERN.finditer(text))
    if not matches:
        return None
    written = f"{int(gold)}" if float(gold).is_integer() else f"{gold}"
    last = matches[-1]
    tokens = tokenizer(text[: last.start()] + written, add_special_tokens=False)["input_ids"]
    return find_answer_number(tokenizer, tokens)


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


def logits_at_rows(
    logits: Float[Tensor, "batch answer_pos d_vocab"], rows: Sequence[int] | Sequence[Sequence[int]]
) -> Float[Tensor, "batch k d_vocab"]:
    """The answer logits at ``k`` chosen rows of each example (``rows[b]``: example b's rows, or one row per
    example, read as ``k = 1``), in the logits' own dtype."""
    index = torch.tensor(rows, device=logits.device)
    index = index[:, None] if index.dim() == 1 else index
    return logits.gather(1, index[..., None].expand(-1, -1, logits.shape[-1]))


# ---------------------------------------------------------------------- two answers compared


@dataclass(frozen=True)
class AnswerContrast:
    """A pair's two answer numbers after one shared answer prefix.

    Attributes:
        prefix: the answer tokens before the number (the reference run's own).
        clean, corrupted: the tokens of each number written after that prefix.
    """

    prefix: tuple[int, ...]
    clean: tuple[int, ...]
    corrupted: tuple[int, ...]

    @property
    def divergence(self) -> int | None:
        """The first index into the numbers where their tokens differ; None when one number's tokens begin
        the other's (``12`` and ``120`` with a digit tokenizer): there is no token at which to compare them."""
        for j, (a, b) in enumerate(zip(self.clean, self.corrupted)):
            if a != b:
                return j
        return None

    def compared_at(self, metric: str) -> int | None:
        """The number token at which a logit-difference metric compares the two answers (None: undefined).
        ``answer_logprob`` compares whole numbers; its KL is read at their first token (0)."""
        if metric == "first_token":
            return 0 if self.clean[0] != self.corrupted[0] else None
        if metric == "first_difference":
            return self.divergence
        return 0 if self.divergence is not None else None

    def forced(self, side: str = "clean", upto: int | None = None) -> AnswerNumber:
        """The answer to teacher-force and the row to read: ``prefix + number[:upto]`` and the row predicting
        ``number[upto]`` of ``side`` (``upto`` None: the whole number, rows from its first token on)."""
        number = self.clean if side == "clean" else self.corrupted
        at = 0 if upto is None else upto
        return AnswerNumber(
            index=len(self.prefix) + at,
            prefix=self.prefix + number[:at],
            token=number[at],
            text="",
            tokens=number[at:],
        )


def whole_number_rows(numbers: Sequence[AnswerNumber]) -> tuple[list[list[int]], list[list[int]], Tensor]:
    """For :func:`number_logprob`: per example the tokens to teacher-force (prefix and the whole number),
    the answer rows predicting each number token (padded to the longest number by repeating the last row),
    and the mask of the real ones ``[batch, max_len]``."""
    width = max(len(n.tokens) for n in numbers)
    forced = [list(n.prefix) + list(n.tokens) for n in numbers]
    rows = [[n.index + min(j, len(n.tokens) - 1) for j in range(width)] for n in numbers]
    mask = torch.tensor([[j < len(n.tokens) for j in range(width)] for n in numbers])
    return forced, rows, mask


def number_logprob(
    logits: Float[Tensor, "batch width d_vocab"], numbers: Sequence[AnswerNumber], mask: Bool[Tensor, "batch width"]
) -> Float[Tensor, " batch"]:
    """``sum_j log p(number_j | prefix, number_<j)`` per example, from the teacher-forced logits at the rows of
    :func:`whole_number_rows` (float64)."""
    width = logits.shape[1]
    targets = torch.tensor(
        [[n.tokens[min(j, len(n.tokens) - 1)] for j in range(width)] for n in numbers], device=logits.device
    )
    logprobs = logits.double().log_softmax(-1).gather(-1, targets[..., None])[..., 0]
    return (logprobs * mask.to(logits.device)).sum(1)


def number_scores(
    model, questions: Sequence[str], numbers: Sequence[AnswerNumber], *, n_latents: int = 6, fwd_hooks=()
) -> tuple[Float[Tensor, "batch d_vocab"], Float[Tensor, " batch"]]:
    """After the latent loop under ``fwd_hooks``, teacher-forced on each number's prefix and all its tokens:
    the logits predicting its first token (float32) and the log-probability of the whole number (float64)."""
    answers, rows, mask = whole_number_rows(numbers)
    scores = model.score_answers(list(questions), answers, n_latents=n_latents, fwd_hooks=fwd_hooks)
    logits = logits_at_rows(scores.logits, rows)
    return logits[:, 0].float(), number_logprob(logits, numbers, mask)
