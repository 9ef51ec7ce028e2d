"""One batch of clean/corrupted pairs made ready for patching: the clean run cached at the sweep's hooks, each
pair's clean and corrupted answer tokens, and the logit differences the recovery is normalised by.

Metrics are taken at the answer: the position predicting the first token of the clean answer's number,
teacher-forced on the clean run's own answer tokens before it (see :mod:`codi_lens.metrics`). A pair whose
metrics would not mean anything is skipped with its reason (:func:`prepare_pairs`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from codi_lens.core.answers import clean_question, format_answer, is_correct
from codi_lens.core.model import CODIModel
from codi_lens.core.positions import CODIPositions
from codi_lens.data.pairs import Rejected, changed_number, question_numbers
from codi_lens.metrics import AnswerNumber, find_answer_number, logit_difference, logits_at_answer


@dataclass
class PairBatch:
    """What a sweep needs about a batch of pairs, computed once.

    Attributes:
        clean_numbers: the clean answer's number position (teacher-forcing prefix, clean token).
        corrupted_tokens: the corrupted answer number's first token, written after the same prefix.
        changed_tokens: per pair, the question-token indices of the changed number in the clean and the
            corrupted question (equal lengths), or None when they tokenize to different lengths.
        clean_logits, corrupted_logits: ``[batch, d_vocab]`` at the answer (float32).
        clean_cache: the clean run's activations for the sweep's hooks.
        clean_thoughts: the clean run's fed thoughts ``[batch, n, d_model]``.
        clean_positions: the clean run's position map.
    """

    clean_numbers: list[AnswerNumber]
    corrupted_tokens: Int[Tensor, " batch"]
    changed_tokens: list[tuple[list[int], list[int]] | None]
    clean_logits: Float[Tensor, "batch d_vocab"]
    corrupted_logits: Float[Tensor, "batch d_vocab"]
    clean_cache: dict[str, Float[Tensor, "batch pos *rest"]]
    clean_thoughts: Float[Tensor, "batch n_latents d_model"]
    clean_positions: CODIPositions

    @property
    def clean_tokens(self) -> Int[Tensor, " batch"]:
        """The clean answer number's first token per pair."""
        return torch.tensor([n.token for n in self.clean_numbers])

    @property
    def ld_clean(self) -> Float[Tensor, " batch"]:
        return logit_difference(self.clean_logits, self.clean_tokens, self.corrupted_tokens)

    @property
    def ld_corrupted(self) -> Float[Tensor, " batch"]:
        return logit_difference(self.corrupted_logits, self.clean_tokens, self.corrupted_tokens)

    def rows(self, rows: Sequence[int]) -> PairBatch:
        """The batch of pairs ``rows`` only (their clean runs and answers)."""
        positions = self.clean_positions
        return replace(
            self,
            clean_numbers=[self.clean_numbers[i] for i in rows],
            corrupted_tokens=self.corrupted_tokens[list(rows)],
            changed_tokens=[self.changed_tokens[i] for i in rows],
            clean_logits=self.clean_logits[list(rows)],
            corrupted_logits=self.corrupted_logits[list(rows)],
            clean_cache={name: acts[list(rows)] for name, acts in self.clean_cache.items()},
            clean_thoughts=self.clean_thoughts[list(rows)],
            clean_positions=replace(
                positions,
                n_pad=[positions.n_pad[i] for i in rows],
                answer_lengths=[positions.answer_lengths[i] for i in rows],
            ),
        )


def number_tokens(model: CODIModel, question: str, number_index: int) -> list[int]:
    """Indices, among the question's tokens as the model tokenizes it (BOS included), of the tokens
    that spell the question's ``number_index``-th number (see :func:`codi_lens.data.pairs.question_numbers`)."""
    text = clean_question(question)
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


def corrupted_answer_token(model: CODIModel, number: AnswerNumber, corrupted_answer: float) -> int | None:
    """The first token of ``corrupted_answer`` written after the clean answer's prefix (None when the
    prefix would tokenize differently, so the two logits would not be comparable)."""
    text = str(int(corrupted_answer)) if float(corrupted_answer).is_integer() else str(corrupted_answer)
    prefix_text = model.tokenizer.decode(list(number.prefix), skip_special_tokens=True)
    ids = model.tokenizer(prefix_text + text, add_special_tokens=False)["input_ids"]
    if tuple(ids[: len(number.prefix)]) != number.prefix or len(ids) <= len(number.prefix):
        # Word-level tokenizers decode with spaces between tokens: try the number as its own word.
        ids = list(number.prefix) + model.tokenizer(text, add_special_tokens=False)["input_ids"]
    found = find_answer_number(model.tokenizer, ids)
    if found is None or found.index != number.index or found.prefix != number.prefix:
        return None
    return found.token


NO_CORRUPTED_PREFERENCE = "the corrupted run does not prefer its own answer's first token to the clean one"


def prepare_pairs(
    model: CODIModel,
    pairs: pd.DataFrame,
    hooks: Sequence[str],
    *,
    n_latents: int = 6,
    max_new_tokens: int = 256,
    answer_from: str = "model",
) -> tuple[PairBatch | None, pd.DataFrame, pd.DataFrame]:
    """Run the clean questions (cached) and find each pair's answer tokens.

    ``answer_from="model"``: the clean run's own generated answer is teacher-forced, and pairs it
    answers wrong are skipped. ``"gold"``: the clean answer written as CODI writes it
    (:func:`codi_lens.core.answers.format_answer`) is teacher-forced whatever the model would say, and
    nothing is generated (for models that do not answer right, e.g. random weights in benchmarks).

    Returns ``(batch, kept, skipped)``: the batch of usable pairs (None if none), their rows, and the
    other pairs with a ``reason`` (clean answered wrong, no answer number, prefixes that tokenize
    differently, clean and corrupted answers sharing their first token, and, with
    ``answer_from="model"``, a corrupted run that does not prefer its own answer's first token to the
    clean one: there the recovery's denominator ``ld_clean - ld_corrupted`` can be near zero, and one
    such pair moved a mean by -0.3 in our runs).
    """
    if answer_from not in ("model", "gold"):
        raise ValueError(f"answer_from must be 'model' or 'gold', got {answer_from!r}")
    clean_q = pairs["clean_question"].tolist()
    gold = answer_from == "gold"
    result, cache = model.run_codi_with_cache(
        clean_q, names_filter=list(hooks), n_latents=n_latents, max_new_tokens=1 if gold else max_new_tokens
    )
    if gold:
        answer_tokens = [
            model.tokenizer(format_answer(a), add_special_tokens=False)["input_ids"] for a in pairs["clean_answer"]
        ]
    else:
        answer_tokens = result.answer_tokens
    reasons, numbers, corrupted_tokens, changed = [], [], [], []
    for i, row in enumerate(pairs.itertuples()):
        number = find_answer_number(model.tokenizer, answer_tokens[i])
        token = None if number is None else corrupted_answer_token(model, number, row.corrupted_answer)
        reason = ""
        if not gold and not is_correct(result.prediction[i], row.clean_answer):
            reason = "the model answers the clean question wrong"
        elif number is None:
            reason = "the clean answer has no number"
        elif token is None:
            reason = "the corrupted answer does not tokenize after the clean prefix"
        elif token == number.token:
            reason = "the clean and corrupted answers share their first token"
        reasons.append(reason)
        numbers.append(number)
        corrupted_tokens.append(token)
        which = _changed_index(row.clean_question, row.corrupted_question)
        if which is None:
            changed.append(None)
        else:
            a, b = number_tokens(model, row.clean_question, which), number_tokens(model, row.corrupted_question, which)
            changed.append((a, b) if len(a) == len(b) and a else None)
    keep = [i for i, r in enumerate(reasons) if not r]
    logits = {"clean": None, "corrupted": None}
    for side in logits if keep else ():
        questions = pairs[f"{side}_question"].iloc[keep].tolist()
        logits[side] = logits_at_answer(model, questions, [numbers[i] for i in keep], n_latents=n_latents)
    if keep and not gold:  # a gold-answer run (random weights) has no preference to ask for
        clean_tok = torch.tensor([numbers[i].token for i in keep])
        own_tok = torch.tensor([corrupted_tokens[i] for i in keep])
        prefers = logit_difference(logits["corrupted"], clean_tok, own_tok) < 0
        for i in (i for i, ok in zip(keep, prefers.tolist()) if not ok):
            reasons[i] = NO_CORRUPTED_PREFERENCE
        logits = {side: value[prefers] for side, value in logits.items()}
        keep = [i for i, ok in zip(keep, prefers.tolist()) if ok]
    skipped = pairs.assign(reason=reasons).iloc[[i for i, r in enumerate(reasons) if r]]
    kept = pairs.iloc[keep].reset_index(drop=True)
    if not keep:
        return None, kept, skipped
    kept_numbers = [numbers[i] for i in keep]
    sub_cache = {name: cache[name][keep] for name in cache.cache_dict}  # the kept pairs' clean activations
    positions = result.positions
    kept_positions = replace(
        positions,
        n_pad=[positions.n_pad[i] for i in keep],
        answer_lengths=[positions.answer_lengths[i] for i in keep],
    )
    batch = PairBatch(
        clean_numbers=kept_numbers,
        corrupted_tokens=torch.tensor([corrupted_tokens[i] for i in keep]),
        changed_tokens=[changed[i] for i in keep],
        clean_logits=logits["clean"],
        corrupted_logits=logits["corrupted"],
        clean_cache=sub_cache,
        clean_thoughts=result.thought_embeds[keep],
        clean_positions=kept_positions,
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
    donors = batch.rows([(i + 1) % n for i in range(n)])
    return replace(
        batch,
        clean_cache=donors.clean_cache,
        clean_thoughts=donors.clean_thoughts,
        clean_positions=donors.clean_positions,
        changed_tokens=[None] * n,
    )
