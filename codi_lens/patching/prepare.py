"""One batch of clean/corrupted pairs made ready for patching: the clean run cached at the sweep's hooks, each
pair's clean and corrupted answer tokens, and the logit differences the recovery is normalised by.

Metrics are taken at the answer, teacher-forced on the clean run's own answer tokens before the number (see
:mod:`codi_lens.metrics`), as ``metric`` says (:data:`~codi_lens.metrics.ANSWER_METRICS`): the logit difference
at the numbers' first token (``first_token``), at the first token where the two numbers differ
(``first_difference``, the default: Llama 3 writes ``1200`` as ``120``, ``0`` and ``1250`` as ``125``, ``0``...
and ``1205`` as ``120``, ``5``, where the first token cannot tell the answers apart), or the log-probability of
the whole clean number minus the whole corrupted one's (``answer_logprob``). A pair whose metric would not
mean anything is skipped with its reason (:func:`prepare_pairs`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from codi_lens.core.answers import is_correct
from codi_lens.core.branching import Branch, Trunk, grow_trunk, run_branches
from codi_lens.core.model import CODIModel
from codi_lens.core.positions import CODIPositions
from codi_lens.data.pairs import Rejected, changed_number, question_numbers
from codi_lens.metrics import (
    ANSWER_METRICS,
    DEFAULT_ANSWER_METRIC,
    AnswerContrast,
    AnswerNumber,
    find_answer_number,
    forced_answers,
    logit_difference,
    number_logprob,
    whole_number_rows,
)


@dataclass
class PairBatch:
    """What a sweep needs about a batch of pairs, computed once.

    Attributes:
        metric: how the two answers are compared (:data:`~codi_lens.metrics.ANSWER_METRICS`).
        contrasts: per pair, the clean answer's prefix and both numbers' tokens.
        clean_numbers: per pair, the compared row: the clean answer teacher-forced up to the token where the
            metric compares the numbers (for ``answer_logprob``, their first token), and that clean token.
        corrupted_tokens: the corrupted number's token at that row.
        changed_tokens: per pair, the question-token indices of the changed number in the clean and the
            corrupted question (equal lengths), or None when they tokenize to different lengths.
        clean_logits, corrupted_logits: ``[batch, d_vocab]`` at the compared row (float32; KL is read there).
        ld_clean, ld_corrupted: the metric of the clean and of the corrupted run ``[batch]`` (float64).
        clean_cache: the clean run's activations for the sweep's hooks.
        clean_thoughts: the clean run's fed thoughts ``[batch, n, d_model]``.
        clean_positions: the clean run's position map.
        corrupted_trunk: the corrupted questions' unpatched run through every thought (their KV cache),
            which every sweep of the batch branches off instead of recomputing it (None: grown when needed).
    """

    metric: str
    contrasts: list[AnswerContrast]
    clean_numbers: list[AnswerNumber]
    corrupted_tokens: Int[Tensor, " batch"]
    changed_tokens: list[tuple[list[int], list[int]] | None]
    clean_logits: Float[Tensor, "batch d_vocab"]
    corrupted_logits: Float[Tensor, "batch d_vocab"]
    ld_clean: Float[Tensor, " batch"]
    ld_corrupted: Float[Tensor, " batch"]
    clean_cache: dict[str, Float[Tensor, "batch pos *rest"]]
    clean_thoughts: Float[Tensor, "batch n_latents d_model"]
    clean_positions: CODIPositions
    corrupted_trunk: Trunk | None = None

    @property
    def clean_tokens(self) -> Int[Tensor, " batch"]:
        """The clean number's token at the compared row, per pair."""
        return torch.tensor([n.token for n in self.clean_numbers])

    @property
    def compared_token(self) -> list[int]:
        """Per pair, which token of the numbers the compared row predicts (0: the first)."""
        return [n.index - len(c.prefix) for n, c in zip(self.clean_numbers, self.contrasts)]

    def rows(self, rows: Sequence[int]) -> PairBatch:
        """The batch of pairs ``rows`` only (their clean runs and answers)."""
        positions, rows = self.clean_positions, list(rows)
        return replace(
            self,
            contrasts=[self.contrasts[i] for i in rows],
            clean_numbers=[self.clean_numbers[i] for i in rows],
            corrupted_tokens=self.corrupted_tokens[rows],
            changed_tokens=[self.changed_tokens[i] for i in rows],
            clean_logits=self.clean_logits[rows],
            corrupted_logits=self.corrupted_logits[rows],
            ld_clean=self.ld_clean[rows],
            ld_corrupted=self.ld_corrupted[rows],
            clean_cache={name: acts[rows] for name, acts in self.clean_cache.items()},
            clean_thoughts=self.clean_thoughts[rows],
            clean_positions=replace(
                positions,
                n_pad=[positions.n_pad[i] for i in rows],
                answer_lengths=[positions.answer_lengths[i] for i in rows],
            ),
            corrupted_trunk=None if self.corrupted_trunk is None else self.corrupted_trunk.rows(rows),
        )

    def trunk_of(self, model: CODIModel, questions: Sequence[str], n_latents: int) -> Trunk:
        """The unpatched run of ``questions`` through every thought: the batch's corrupted run when those are
        its corrupted questions, else grown here."""
        trunk = self.corrupted_trunk
        if trunk is not None and trunk.serves(questions, n_latents, through=n_latents):
            return trunk
        return grow_trunk(model, list(questions), n_latents=n_latents)


@dataclass(frozen=True)
class Reading:
    """One teacher-forced pass a metric reads: what each pair's answer is forced to and which rows are read.

    Attributes:
        answers: per pair, the answer tokens to teacher-force.
        rows: per pair, the answer rows whose logits are read (one row, or one per number token).
        numbers: per pair, the number read there (its tokens are the targets of ``answer_logprob``).
        mask: ``[batch, width]``, the real rows among padded ones (None for one row per pair).
        sign: +1 for the clean side of the metric, -1 for the corrupted side.
    """

    answers: list[list[int]]
    rows: list[int] | list[list[int]]
    numbers: list[AnswerNumber]
    mask: Bool[Tensor, "batch width"] | None
    sign: float


def readings(metric: str, contrasts: Sequence[AnswerContrast], compared: Sequence[AnswerNumber]) -> list[Reading]:
    """The teacher-forced passes ``metric`` reads: the compared row (a logit difference), or the whole clean
    and the whole corrupted number (``answer_logprob``); the first pass's first row is where KL is read."""
    if metric != "answer_logprob":
        return [Reading(forced_answers(compared), [n.index for n in compared], list(compared), None, 1.0)]
    out = []
    for side, sign in (("clean", 1.0), ("corrupted", -1.0)):
        numbers = [c.forced(side) for c in contrasts]
        answers, rows, mask = whole_number_rows(numbers)
        out.append(Reading(answers, rows, numbers, mask, sign))
    return out


def batch_readings(batch: PairBatch) -> list[Reading]:
    """:func:`readings` of a prepared batch."""
    return readings(batch.metric, batch.contrasts, batch.clean_numbers)


def reading_value(
    reading: Reading, logits: Float[Tensor, "batch width d_vocab"], clean_tokens: Tensor, corrupted_tokens: Tensor
) -> Float[Tensor, " batch"]:
    """One reading's signed part of the metric from its logits (``[batch, d_vocab]`` or ``[batch, width,
    d_vocab]``): the logit difference at the compared row, or the number's summed log-probability."""
    if reading.mask is None:
        logits = logits if logits.dim() == 2 else logits[:, 0]
        return reading.sign * logit_difference(logits, clean_tokens, corrupted_tokens)
    return reading.sign * number_logprob(logits, reading.numbers, reading.mask)


def metric_value(
    batch_or_readings: PairBatch | Sequence[Reading],
    logits: Sequence[Tensor],
    clean_tokens: Tensor | None = None,
    corrupted_tokens: Tensor | None = None,
) -> Float[Tensor, " batch"]:
    """The metric from the logits of each reading (in :func:`readings` order), float64."""
    if isinstance(batch_or_readings, PairBatch):
        batch = batch_or_readings
        reads, clean_tokens, corrupted_tokens = batch_readings(batch), batch.clean_tokens, batch.corrupted_tokens
    else:
        reads = list(batch_or_readings)
    return sum(reading_value(r, x, clean_tokens, corrupted_tokens) for r, x in zip(reads, logits, strict=True))


def trunk_logits(model: CODIModel, trunk: Trunk, reading: Reading) -> Float[Tensor, "batch width d_vocab"]:
    """A reading's logits for the trunk's questions, unpatched: the answer teacher-forced after the trunk's
    KV cache, float32."""
    (output,) = run_branches(
        model, trunk, [Branch(start=trunk.positions.n_latents + 1)], reading.answers, answer_index=reading.rows
    )
    return output.logits.float()


def number_tokens(model: CODIModel, question: str, number_index: int) -> list[int]:
    """Indices, among the question's tokens as the model tokenizes it (BOS included), of the tokens
    that spell the question's ``number_index``-th number (see :func:`codi_lens.data.pairs.question_numbers`)."""
    text = model.latent_loop.question_text(question)
    start, written, _ = question_numbers(text)[number_index]
    encoded = model.tokenizer(text, return_offsets_mapping=True)
    end = start + len(written)
    return [i for i, (a, b) in enumerate(encoded["offset_mapping"]) if b > a and a < end and b > start]


def _changed_index(clean: str, corrupted: str) -> int | None:
    """Which of the question's numbers the pair changed (None unless exactly one differs)."""
    try:
        return changed_number(clean, corrupted)[0]
    except Rejected:
        return None


def corrupted_number_tokens(tokenizer, number: AnswerNumber, corrupted_answer: float) -> tuple[int, ...] | None:
    """The tokens of ``corrupted_answer`` written after the clean answer's prefix, in ``tokenizer``'s ids (None
    when the prefix would tokenize differently, so the two answers' logits would not be comparable)."""
    text = str(int(corrupted_answer)) if float(corrupted_answer).is_integer() else str(corrupted_answer)
    # The corrupted number written where the clean one stands, so what the clean number's first token held
    # before its digits (a space, in byte-level BPE) stays with it.
    written = tokenizer.decode(list(number.prefix) + list(number.tokens), skip_special_tokens=True)
    at = written.rfind(number.text)
    ids = tokenizer(written[:at] + text, add_special_tokens=False)["input_ids"]
    if tuple(ids[: len(number.prefix)]) != number.prefix or len(ids) <= len(number.prefix):
        # Word-level tokenizers decode with spaces between tokens: try the number as its own word.
        ids = list(number.prefix) + tokenizer(text, add_special_tokens=False)["input_ids"]
    found = find_answer_number(tokenizer, ids)
    if found is None or found.index != number.index or found.prefix != number.prefix:
        return None
    return found.tokens


NO_CORRUPTED_PREFERENCE = "the corrupted run does not prefer its own answer to the clean one"
#: Why a pair's metric is undefined, per metric.
NO_COMPARED_TOKEN = {
    "first_token": "the clean and corrupted answers share their first token",
    "first_difference": "one answer number's tokens begin the other's",
    "answer_logprob": "one answer number's tokens begin the other's",
}


def prepare_pairs(
    model: CODIModel,
    pairs: pd.DataFrame,
    hooks: Sequence[str],
    *,
    n_latents: int = 6,
    max_new_tokens: int = 256,
    answer_from: str = "model",
    metric: str = DEFAULT_ANSWER_METRIC,
) -> tuple[PairBatch | None, pd.DataFrame, pd.DataFrame]:
    """Run the clean questions (cached) and find each pair's answer tokens.

    ``answer_from="model"``: the clean run's own generated answer is teacher-forced, and pairs it
    answers wrong are skipped. ``"gold"``: the clean answer written as the model's method writes it
    (:meth:`~codi_lens.core.latent_loop.LatentLoop.answer_text`) is teacher-forced whatever the model would say, and
    nothing is generated (for models that do not answer right, e.g. random weights in benchmarks).
    ``metric``: how the two answers are compared (:data:`~codi_lens.metrics.ANSWER_METRICS`).

    Returns ``(batch, kept, skipped)``: the batch of usable pairs (None if none), their rows, and the
    other pairs with a ``reason`` (clean answered wrong, no answer number, prefixes that tokenize
    differently, answers the metric cannot tell apart (:data:`NO_COMPARED_TOKEN`), and, with
    ``answer_from="model"``, a corrupted run that does not prefer its own answer to the clean one
    (``ld_corrupted >= 0``): there the recovery's denominator ``ld_clean - ld_corrupted`` can be near zero,
    and one such pair moved a mean by -0.3 in our runs).
    """
    if answer_from not in ("model", "gold"):
        raise ValueError(f"answer_from must be 'model' or 'gold', got {answer_from!r}")
    ANSWER_METRICS[metric]
    clean_q = pairs["clean_question"].tolist()
    gold = answer_from == "gold"
    result, cache = model.run_codi_with_cache(
        clean_q, names_filter=list(hooks), n_latents=n_latents, max_new_tokens=1 if gold else max_new_tokens
    )
    if gold:
        answer_tokens = [
            model.tokenizer(model.latent_loop.answer_text(a), add_special_tokens=False)["input_ids"]
            for a in pairs["clean_answer"]
        ]
    else:
        answer_tokens = result.answer_tokens
    reasons, contrasts, compared, changed = [], [], [], []
    for i, row in enumerate(pairs.itertuples()):
        number = find_answer_number(model.tokenizer, answer_tokens[i])
        corrupted = None if number is None else corrupted_number_tokens(model.tokenizer, number, row.corrupted_answer)
        contrast = None if corrupted is None else AnswerContrast(number.prefix, number.tokens, corrupted)
        at = None if contrast is None else contrast.compared_at(metric)
        reason = ""
        if not gold and not is_correct(result.prediction[i], row.clean_answer):
            reason = "the model answers the clean question wrong"
        elif number is None:
            reason = "the clean answer has no number"
        elif corrupted is None:
            reason = "the corrupted answer does not tokenize after the clean prefix"
        elif at is None:
            reason = NO_COMPARED_TOKEN[metric]
        reasons.append(reason)
        contrasts.append(contrast)
        compared.append(None if reason else contrast.forced("clean", at))
        which = _changed_index(row.clean_question, row.corrupted_question)
        if which is None:
            changed.append(None)
        else:
            a, b = number_tokens(model, row.clean_question, which), number_tokens(model, row.corrupted_question, which)
            changed.append((a, b) if len(a) == len(b) and a else None)
    keep = [i for i, r in enumerate(reasons) if not r]
    if not keep:
        return None, pairs.iloc[[]].reset_index(drop=True), pairs.assign(reason=reasons)
    kept_contrasts, kept_compared = [contrasts[i] for i in keep], [compared[i] for i in keep]
    at = [n.index - len(c.prefix) for c, n in zip(kept_contrasts, kept_compared)]
    corrupted_tokens = torch.tensor([c.corrupted[j] for c, j in zip(kept_contrasts, at)])
    clean_tokens = torch.tensor([n.token for n in kept_compared])
    reads = readings(metric, kept_contrasts, kept_compared)
    logits, value, trunks = {}, {}, {}
    for side in ("clean", "corrupted"):
        # Each side's run is grown once and every reading teacher-forced after it; the corrupted one stays in
        # the batch for the sweeps to branch off.
        trunks[side] = grow_trunk(model, pairs[f"{side}_question"].iloc[keep].tolist(), n_latents=n_latents)
        side_logits = [trunk_logits(model, trunks[side], r) for r in reads]
        logits[side] = side_logits[0][:, 0]
        value[side] = metric_value(reads, side_logits, clean_tokens, corrupted_tokens)
    prefers = value["corrupted"] < 0 if not gold else torch.ones(len(keep), dtype=torch.bool)
    for i in (i for i, ok in zip(keep, prefers.tolist()) if not ok):
        reasons[i] = NO_CORRUPTED_PREFERENCE
    chosen = [n for n, ok in enumerate(prefers.tolist()) if ok]  # among the kept so far
    keep = [keep[n] for n in chosen]
    skipped = pairs.assign(reason=reasons).iloc[[i for i, r in enumerate(reasons) if r]]
    kept = pairs.iloc[keep].reset_index(drop=True)
    if not keep:
        return None, kept, skipped
    positions, corrupted = result.positions, trunks["corrupted"]
    batch = PairBatch(
        metric=metric,
        contrasts=[kept_contrasts[n] for n in chosen],
        clean_numbers=[kept_compared[n] for n in chosen],
        corrupted_tokens=corrupted_tokens[chosen],
        changed_tokens=[changed[i] for i in keep],
        clean_logits=logits["clean"][chosen],
        corrupted_logits=logits["corrupted"][chosen],
        ld_clean=value["clean"][chosen].cpu(),
        ld_corrupted=value["corrupted"][chosen].cpu(),
        clean_cache={name: cache[name][keep] for name in cache.cache_dict},  # the kept pairs' clean activations
        clean_thoughts=result.thought_embeds[keep],
        clean_positions=replace(
            positions,
            n_pad=[positions.n_pad[i] for i in keep],
            answer_lengths=[positions.answer_lengths[i] for i in keep],
        ),
        corrupted_trunk=corrupted if len(chosen) == corrupted.batch else corrupted.rows(chosen),
    )
    return batch, kept, skipped


def from_other_problems(batch: PairBatch) -> PairBatch:
    """The control donor: each pair's clean activations replaced by the next pair's clean run (the last
    pair takes the first's), everything measured against the pair's own answers. A patch that
    recovers the answer because it carries *this* problem's values recovers nothing from another's.
    Needs two pairs or more; ``changed`` sites have no counterpart in another question."""
    n = len(batch.clean_numbers)
    if n < 2:
        raise ValueError("patching from other problems needs at least two pairs in a batch")
    donors = replace(batch, corrupted_trunk=None).rows([(i + 1) % n for i in range(n)])  # clean fields only
    return replace(
        batch,
        clean_cache=donors.clean_cache,
        clean_thoughts=donors.clean_thoughts,
        clean_positions=donors.clean_positions,
        changed_tokens=[None] * n,
    )
