"""Activation patching inside the real latent loop.

The clean run's activation at (hook, position) is written into the corrupted run, and the corrupted
run's own loop goes on from there: a patched thought changes what the model computes and feeds back
afterwards. Positions are matched by name (thought k to thought k, EOT to EOT), never by raw index,
so clean and corrupted questions of different lengths patch the same thought. The changed number's
own question tokens are matched by their index in each question.

Metrics per cell, at the answer (the position predicting the first token of the answer number,
teacher-forced on the clean run's own answer tokens before it; see :mod:`codi_lens.metrics`):

- ``logit_diff``: ``LD = logit[clean answer token] - logit[corrupted answer token]`` of the patched run;
- ``recovery``: ``(LD_patched - LD_corrupted) / (LD_clean - LD_corrupted)`` (NaN when the denominator is 0);
- ``kl``: ``KL(clean || patched)`` in nats;
- ``answer_class`` (only with ``generate=True``): the patched run's generated answer is the clean
  one, the corrupted one, or other.

Cells (:class:`Cell`): a hook (``blocks.L.hook_resid_post``, ``..._pre``, ``hook_attn_out``,
``hook_mlp_out``, one head of ``attn.hook_z``, or the fed thought ``thought.k.hook_input``) at one
position (``question:-1``, the changed number's tokens, BOT, thought k, EOT), or at every thought of
one layer at once (layer-only).

Attribution patching (``method="attribution"``, :func:`cell_attributions`): one corrupted forward with
autograd and one backward pass give every cell's linear estimate ``(a_clean - a_corrupted) . dLD/da``,
with gradients through the unrolled loop (:mod:`codi_lens.gradients`); :func:`rank_agreement` says how
well it ranks cells against exact patching. ``python -m benchmarks.attribution`` measures both.

Speed: the clean and the corrupted runs are computed once per batch of pairs; every cell branches off
the corrupted run at the first step it changes (a cell at thought 4 reuses the corrupted run's KV
cache over the question, BOT and thoughts 1..3), cells with the same start run as blocks of one
forward, and the unembedding runs only at the answer row (:mod:`codi_lens.branching`). Metrics come
from teacher forcing; answers are generated only with ``generate=True``.
``python -m benchmarks.patch_sweep`` measures this against one full run per cell.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.stats
import torch
from jaxtyping import Float
from torch import Tensor

from codi_lens.answers import clean_question, format_answer, is_correct
from codi_lens.branching import QUESTION, Branch, grow_trunk, run_branches
from codi_lens.cache import ActivationRecorder
from codi_lens.distributed import Executor
from codi_lens.gradients import LoopGradients, loop_gradients
from codi_lens.hooks import PositionalHook
from codi_lens.interventions import Hooks, replace_at, replace_thoughts
from codi_lens.metrics import (
    AnswerNumber,
    classify_answer,
    find_answer_number,
    forced_answers,
    kl_divergence,
    logit_difference,
    logits_at_answer,
    normalised_recovery,
)
from codi_lens.model import CODIModel
from codi_lens.pairs import Rejected, changed_number, question_numbers
from codi_lens.runner import UNIT_COLUMN, ResultStore

#: How a sweep measures a cell: by patching it, or by the gradient's linear estimate.
METHODS = ("exact", "attribution")
#: Whose clean run a patch copies: the pair's own, or (the control) another pair's of the same batch.
DONORS = ("clean", "other")

#: Positions that stand for a span of latent steps (patched at once), with the first step each covers:
#: every thought 1..n, or BOT and every thought (all the run computes between question and EOT).
SPAN_STARTS = {"thoughts": 1, "latents": 0}

#: Hook kinds a sweep can patch, by the suffix of their TransformerLens name.
HOOK_KINDS = ("resid_post", "resid_pre", "attn_out", "mlp_out", "z", "thought_input")


@dataclass(frozen=True)
class Cell:
    """One patch: ``kind`` at ``layer`` (and ``head`` for ``z``) at ``position``.

    ``position`` is a name (``"thought:3"``, ``"bot"``, ``"eot"``, ``"question:-1"``), ``"changed"``
    (the changed number's question tokens), ``"thoughts"`` (every thought 1..n at once) or ``"latents"``
    (BOT and every thought at once); the last two are layer-only.
    For ``thought_input`` the layer is None and the position is ``thought:k``.
    """

    kind: str
    layer: int | None
    position: str
    head: int | None = None

    @property
    def hook(self) -> str:
        if self.kind == "thought_input":
            return f"thought.{self.thought}.hook_input"
        if self.kind == "z":
            return f"blocks.{self.layer}.attn.hook_z"
        return f"blocks.{self.layer}.hook_{self.kind}"

    def position_names(self, n_latents: int) -> list[str]:
        """The named positions the cell writes: thoughts 1..n for ``"thoughts"``, BOT and thoughts 1..n
        for ``"latents"``, else its own position (not for ``"changed"``, whose tokens are found per
        question)."""
        if self.position in SPAN_STARTS:
            first = SPAN_STARTS[self.position]
            return ["bot"] * (first == 0) + [f"thought:{k}" for k in range(1, n_latents + 1)]
        return [self.position]

    @property
    def thought(self) -> int | None:
        """0 for BOT, k for thought k, None for other positions."""
        if self.position == "bot":
            return 0
        if self.position.startswith("thought:"):
            return int(self.position.split(":")[1])
        return None


def sweep_cells(
    n_layers: int,
    n_latents: int = 6,
    *,
    kinds: Sequence[str] = ("resid_post",),
    positions: Sequence[str] | None = None,
    n_heads: int | None = None,
    layer_only: bool = False,
) -> list[Cell]:
    """Every (hook, position) cell of a sweep. Default positions: the changed number's tokens, the last
    question token, BOT, thoughts 1..n, EOT. ``layer_only`` adds, per layer and kind, two cells: every
    thought at once (``"thoughts"``) and BOT with every thought (``"latents"``). ``thought_input`` cells
    (the fed thought, position only) cover thoughts 1..n."""
    unknown = [k for k in kinds if k not in HOOK_KINDS]
    if unknown:
        raise ValueError(f"unknown hook kind {unknown[0]!r}; expected some of {HOOK_KINDS}")
    if positions is None:
        positions = ["changed", "question:-1", "bot", *[f"thought:{k}" for k in range(1, n_latents + 1)], "eot"]
    cells = []
    for kind in kinds:
        if kind == "thought_input":
            cells += [Cell(kind, None, f"thought:{k}") for k in range(1, n_latents + 1)]
            continue
        for layer in range(n_layers):
            heads = range(n_heads or 0) if kind == "z" else [None]
            for head in heads:
                cells += [Cell(kind, layer, p, head) for p in positions]
                if layer_only:
                    cells += [Cell(kind, layer, span, head) for span in SPAN_STARTS]
    return cells


# ---------------------------------------------------------------------- one batch of pairs
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
    corrupted_tokens: Tensor
    changed_tokens: list[tuple[list[int], list[int]] | None]
    clean_logits: Tensor
    corrupted_logits: Tensor
    clean_cache: Any
    clean_thoughts: Tensor
    clean_positions: Any

    @property
    def ld_clean(self) -> Tensor:
        return logit_difference(self.clean_logits, self._clean_tokens, self.corrupted_tokens)

    @property
    def ld_corrupted(self) -> Tensor:
        return logit_difference(self.corrupted_logits, self._clean_tokens, self.corrupted_tokens)

    @property
    def _clean_tokens(self) -> Tensor:
        return torch.tensor([n.token for n in self.clean_numbers])


def number_tokens(model: CODIModel, question: str, number_index: int) -> list[int]:
    """Indices, among the question's tokens as the model tokenizes it (BOS included), of the tokens
    that spell the question's ``number_index``-th number (see :func:`codi_lens.pairs.question_numbers`)."""
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


def replace_question_tokens(
    model: CODIModel,
    hook_name: str,
    token_index: Sequence[Sequence[int]],
    values: Sequence[Tensor],
    *,
    head: int | None = None,
) -> Hooks:
    """Write ``values[i]`` (``[n_i, *rest]``) at question tokens ``token_index[i]`` of example i
    (indices counted from each question's first token, as ``question:j``), in the question's chunk;
    with ``head``, only that head's slice of ``[..., head, d_head]`` activations."""

    def hook(acts: Tensor, hook) -> Tensor:
        context = model.chunk_context
        if context.start != 0:  # the question is computed in the first chunk only
            return acts
        out = acts.clone()
        for i, (index, value) in enumerate(zip(token_index, values)):
            if len(index):
                where = torch.tensor(index, device=acts.device) + context.layout.n_pad[i]
                value = value.to(device=acts.device, dtype=acts.dtype)
                if head is None:
                    out[i, where] = value
                else:
                    out[i, where, head] = value[:, head]
        return out

    return [(hook_name, hook)]


def cell_hooks(model: CODIModel, cell: Cell, batch: PairBatch, rows: Sequence[int] | None = None) -> Hooks:
    """The ``fwd_hooks`` writing the clean activation of ``cell`` into the corrupted run."""
    rows = list(range(len(batch.clean_numbers))) if rows is None else list(rows)
    if cell.kind == "thought_input":
        return replace_thoughts({cell.thought: batch.clean_thoughts[rows, cell.thought - 1]})
    acts = batch.clean_cache[cell.hook][rows]
    if cell.position == "changed":
        index = [batch.changed_tokens[r] for r in rows]
        clean_index = [x[0] if x else [] for x in index]
        values = [
            acts[i, torch.tensor(ci, dtype=torch.long) + batch.clean_positions.n_pad[r]]
            for i, (ci, r) in enumerate(zip(clean_index, rows))
        ]
        corrupted_index = [x[1] if x else [] for x in index]
        return replace_question_tokens(model, cell.hook, corrupted_index, values, head=cell.head)
    names = cell.position_names(batch.clean_positions.n_latents)
    where = batch.clean_positions.resolve(names)[rows]  # [batch, n] in the clean run
    values = torch.stack([acts[i, where[i]] for i in range(len(rows))])  # [batch, n, ...]
    if cell.head is None:
        return replace_at(model, cell.hook, names, values)
    head = cell.head

    def transform(current: Tensor, hook, which: Tensor) -> Tensor:
        out = current.clone()
        out[:, :, head] = values[:, which.to(values.device), head].to(device=current.device, dtype=current.dtype)
        return out

    return [(cell.hook, PositionalHook(model, names, transform))]


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
    (:func:`codi_lens.answers.format_answer`) is teacher-forced whatever the model would say, and
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
    sub_cache = {name: cache[name][keep] for name in cache.cache_dict}
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
    Needs two pairs or more; ``changed`` cells have no counterpart in another question."""
    n = len(batch.clean_numbers)
    if n < 2:
        raise ValueError("patching from other problems needs at least two pairs in a batch")
    order = [(i + 1) % n for i in range(n)]
    positions = batch.clean_positions
    return replace(
        batch,
        clean_cache={name: acts[order] for name, acts in batch.clean_cache.items()},
        clean_thoughts=batch.clean_thoughts[order],
        clean_positions=replace(
            positions,
            n_pad=[positions.n_pad[i] for i in order],
            answer_lengths=[positions.answer_lengths[i] for i in order],
        ),
        changed_tokens=[None] * n,
    )


def _skipped_rows(skipped: pd.DataFrame) -> pd.DataFrame:
    """One row per skipped pair with its reason (so a resumed run knows it was seen)."""
    return pd.DataFrame({UNIT_COLUMN: skipped["pair_id"], "pair_id": skipped["pair_id"], "reason": skipped["reason"]})


def cell_start(cell: Cell, n_latents: int) -> int:
    """The first step of the run a cell changes (see :mod:`codi_lens.branching`): the question for
    question-token cells, 0 for BOT, k for thought k, the first step of a span, n + 1 for EOT."""
    if cell.position in SPAN_STARTS:
        return SPAN_STARTS[cell.position]
    if cell.position == "eot":
        return n_latents + 1
    if cell.thought is not None:
        return cell.thought
    return QUESTION


def cell_branches(model: CODIModel, batch: PairBatch, cells: Sequence[Cell], n_latents: int) -> list[Branch]:
    """One branch of the corrupted run per cell."""
    return [Branch(cell_hooks(model, cell, batch), cell_start(cell, n_latents)) for cell in cells]


def cell_logits(
    model: CODIModel,
    batch: PairBatch,
    questions: Sequence[str],
    cells: Sequence[Cell],
    *,
    n_latents: int = 6,
    max_rows: int = 256,
) -> list[Tensor]:
    """The corrupted run's logits at the answer under each cell, ``[batch, d_vocab]`` per cell (float32).

    The corrupted run is computed once; each cell branches off it at the first step it changes, cells
    with the same start batched as blocks of one forward (at most ``max_rows`` rows), and the
    unembedding runs only at the answer row (see :mod:`codi_lens.branching`)."""
    return [out.logits[:, 0].float() for out in _run_cells(model, batch, questions, cells, n_latents, max_rows, 0)]


def _run_cells(model, batch: PairBatch, questions, cells, n_latents: int, max_rows: int, max_new_tokens: int):
    trunk = grow_trunk(model, list(questions), n_latents=n_latents)
    return run_branches(
        model,
        trunk,
        cell_branches(model, batch, cells, n_latents),
        forced_answers(batch.clean_numbers),
        answer_index=[n.index for n in batch.clean_numbers],
        max_new_tokens=max_new_tokens,
        max_rows=max_rows,
    )


def cell_attributions(
    model: CODIModel, batch: PairBatch, questions: Sequence[str], cells: Sequence[Cell], *, n_latents: int = 6
) -> list[Float[Tensor, " batch"]]:
    """Attribution patching: the linear estimate of each cell's change in logit difference,
    ``(a_clean - a_corrupted) . dLD/da`` summed over the cell's positions (and, for ``z``, its head).

    One teacher-forced corrupted run with autograd and one backward pass serve every single-position
    cell: the gradient flows through the unrolled loop (:mod:`codi_lens.gradients`), so a cell at
    thought k counts, to first order, what its change does to thoughts k + 1..n. Span cells (every
    thought at once, or BOT and every thought) take one more pass per hook and span, with partial
    derivatives at the span's positions.
    Returns ``[batch]`` per cell."""
    clean_tok = batch._clean_tokens

    def gradients(hooks: list[str], hold=None, start: int = QUESTION) -> LoopGradients:
        return loop_gradients(
            model,
            questions,
            forced_answers(batch.clean_numbers),
            [n.index for n in batch.clean_numbers],
            lambda logits: logit_difference(
                logits, clean_tok.to(logits.device), batch.corrupted_tokens.to(logits.device)
            ),
            hooks,
            n_latents=n_latents,
            hold=hold,
            start=start,
        )

    single = [c for c in cells if c.position not in SPAN_STARTS]
    start = min((cell_start(c, n_latents) for c in single), default=QUESTION)  # autograd from the first step asked
    run = gradients(sorted({c.hook for c in single if c.kind != "thought_input"}), start=start)
    # A cell replacing a span of steps at once cuts the paths from one step through the next at its hook:
    # its estimate needs partial derivatives there, one more backward pass per such hook and span.
    held = {
        (c.hook, c.position): gradients([c.hook], {c.hook: c.position_names(n_latents)}, start=cell_start(c, n_latents))
        for c in cells
        if c.position in SPAN_STARTS
    }
    return [_cell_attribution(cell, batch, held.get((cell.hook, cell.position), run)) for cell in cells]


def _cell_attribution(cell: Cell, batch: PairBatch, run: LoopGradients) -> Tensor:
    if cell.kind == "thought_input":
        k = cell.thought - 1
        delta = batch.clean_thoughts[:, k].to(run.thought_inputs) - run.thought_inputs[:, k]
        return (delta * run.thought_grads[:, k]).flatten(1).sum(1)
    clean, acts, grads = batch.clean_cache[cell.hook], run.acts[cell.hook], run.grads[cell.hook]
    size = len(batch.clean_numbers)
    if cell.position == "changed":
        where_clean, where_run = [], []
        for i, index in enumerate(batch.changed_tokens):
            a, b = index if index else ([], [])
            where_clean.append(torch.tensor(a, dtype=torch.long) + batch.clean_positions.n_pad[i])
            where_run.append(torch.tensor(b, dtype=torch.long) + run.positions.n_pad[i])
    else:
        names = cell.position_names(run.positions.n_latents)
        where_clean = list(batch.clean_positions.resolve(names))
        where_run = list(run.positions.resolve(names))
    total = []
    for i in range(size):
        delta = clean[i, where_clean[i]].to(acts) - acts[i, where_run[i]]
        grad = grads[i, where_run[i]]
        if cell.head is not None:
            delta, grad = delta[:, cell.head], grad[:, cell.head]
        total.append((delta * grad).sum())
    return torch.stack(total)


def patch_rows(
    model: CODIModel,
    pairs: pd.DataFrame,
    cells: Sequence[Cell],
    *,
    n_latents: int = 6,
    max_new_tokens: int = 256,
    generate: bool = False,
    max_rows: int = 256,
    method: str = "exact",
    donor: str = "clean",
) -> pd.DataFrame:
    """Every cell on a batch of pairs: one row per (pair, cell), plus one row per skipped pair with its
    ``reason`` (and NaN metrics), so a resumed run knows it was seen.

    ``donor="other"`` is the control: each pair is patched with another pair's clean run
    (:func:`from_other_problems`); a batch left with one usable pair skips it (``reason`` says so).

    ``method="exact"``: the clean and the corrupted runs are computed once and cells branch off the
    corrupted one (see :func:`cell_logits`); with ``generate=True`` each branch also generates its
    answer, in the same forwards. ``method="attribution"``: every cell's logit difference is the
    linear estimate of :func:`cell_attributions` (``kl`` is NaN: it has no linear estimate); the
    ``method`` column says which."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if generate and method == "attribution":
        raise ValueError("attribution patching estimates metrics; it cannot generate answers (generate=False)")
    if donor not in DONORS:
        raise ValueError(f"donor must be one of {DONORS}, got {donor!r}")
    if donor == "other" and any(c.position == "changed" for c in cells):
        raise ValueError("'changed' cells have no counterpart in another problem's question; leave them out")
    hooks = sorted({c.hook for c in cells if c.kind != "thought_input"})
    batch, kept, skipped = prepare_pairs(model, pairs, hooks, n_latents=n_latents, max_new_tokens=max_new_tokens)
    if donor == "other" and len(kept) == 1:
        skipped = pd.concat([skipped, kept.assign(reason="no other usable pair in the batch to take values from")])
        batch = None
    frames = [_skipped_rows(skipped).assign(donor=donor)]
    if batch is None:
        return frames[0]
    if donor == "other":
        batch = from_other_problems(batch)
    corrupted_q = kept["corrupted_question"].tolist()
    ld_clean, ld_corrupted = batch.ld_clean, batch.ld_corrupted
    clean_tok = batch._clean_tokens
    if method == "exact":
        outputs = _run_cells(model, batch, corrupted_q, cells, n_latents, max_rows, max_new_tokens if generate else 0)
        logits = [out.logits[:, 0].float() for out in outputs]
        lds = [logit_difference(x, clean_tok, batch.corrupted_tokens) for x in logits]
        kls = [kl_divergence(batch.clean_logits, x).cpu().numpy() for x in logits]
    else:
        outputs = [None] * len(cells)
        lds = [
            ld_corrupted + estimate.detach().cpu()
            for estimate in cell_attributions(model, batch, corrupted_q, cells, n_latents=n_latents)
        ]
        kls = [np.full(len(kept), np.nan)] * len(cells)
    for cell, output, ld_all, kl in zip(cells, outputs, lds, kls):
        rows = list(range(len(kept)))
        if cell.position == "changed":  # pairs whose changed number tokenizes alike in both questions
            rows = [i for i in rows if batch.changed_tokens[i] is not None]
            if not rows:
                continue
        ld = ld_all[rows]
        frame = pd.DataFrame(
            {
                UNIT_COLUMN: kept["pair_id"].iloc[rows].to_numpy(),
                "pair_id": kept["pair_id"].iloc[rows].to_numpy(),
                "n_steps": kept["n_steps"].iloc[rows].to_numpy() if "n_steps" in kept else np.nan,
                "method": method,
                "donor": donor,
                "kind": cell.kind,
                "hook": cell.hook,
                "layer": np.nan if cell.layer is None else cell.layer,
                "head": np.nan if cell.head is None else cell.head,
                "position": cell.position,
                "thought": np.nan if cell.thought is None else cell.thought,
                "logit_diff": ld.cpu().numpy(),
                "ld_clean": ld_clean[rows].cpu().numpy(),
                "ld_corrupted": ld_corrupted[rows].cpu().numpy(),
                "recovery": normalised_recovery(ld, ld_corrupted[rows], ld_clean[rows]),
                "kl": kl[rows],
                "reason": "",
            }
        )
        if generate:
            _, predictions = model.decode_answers([output.answer_tokens[i] for i in rows])
            frame["prediction"] = [np.nan if p is None else p for p in predictions]
            frame["answer_class"] = [
                classify_answer(p, kept["clean_answer"].iloc[i], kept["corrupted_answer"].iloc[i])
                for p, i in zip(predictions, rows)
            ]
        frames.append(frame)
    return pd.concat([f for f in frames if len(f)], ignore_index=True)


def rank_agreement(exact: pd.DataFrame, estimated: pd.DataFrame, *, k: int = 10, value: str = "recovery") -> dict:
    """How well an estimate (attribution) ranks cells against exact patching.

    Both tables hold rows of the same cells and pairs (``patch_rows`` output); each cell's mean
    ``value`` over pairs is compared: Spearman's rho over cells (``scipy.stats.spearmanr``), and the
    share of exact's top ``k`` cells (largest mean) that are also in the estimate's top ``k``
    (``k`` is cut to the number of cells). Returns ``{cells, spearman, k, top_k_overlap}``."""
    keys = ["hook", "head", "position"]

    def per_cell(rows: pd.DataFrame) -> pd.Series:
        used = rows[rows["reason"].fillna("") == ""]
        return used.fillna({"head": -1}).groupby(keys)[value].mean()

    a, b = per_cell(exact).align(per_cell(estimated), join="inner")
    if len(a) < 2:
        raise ValueError("the two tables share fewer than two cells")
    k = min(k, len(a))
    top_a, top_b = set(a.nlargest(k).index), set(b.nlargest(k).index)
    return {
        "cells": len(a),
        "spearman": float(scipy.stats.spearmanr(a.to_numpy(), b.to_numpy()).statistic),
        "k": k,
        "top_k_overlap": len(top_a & top_b) / k,
    }


def patch_sweep(
    model: CODIModel,
    pairs: pd.DataFrame,
    out: str | Path,
    *,
    cells: Sequence[Cell] | None = None,
    n_latents: int = 6,
    max_new_tokens: int = 256,
    generate: bool = False,
    batch_size: int = 16,
    max_rows: int = 256,
    method: str = "exact",
    donor: str = "clean",
    settings: dict[str, Any] | None = None,
    overwrite: bool = False,
    progress: bool = True,
    executor: Executor | None = None,
) -> tuple[pd.DataFrame, ResultStore]:
    """Patch every cell (default: ``resid_post`` of every layer at every default position, plus the
    layer-only cells) on every pair, resumable in ``out``: ``batch_size`` pairs at a time, cells
    batched into forwards of at most ``max_rows`` rows (cells x pairs). Returns the rows (skipped pairs
    carry a ``reason``) and the store. ``method``: ``"exact"`` (patch every cell) or ``"attribution"``
    (one forward and one backward pass per batch give every cell's linear estimate; see
    :func:`cell_attributions` and :func:`rank_agreement`). ``donor="other"``: the control, each pair
    patched from another pair's clean run (see :func:`patch_rows`).
    ``executor``: where batches run (default here; :class:`~codi_lens.distributed.RayExecutor`: Ray tasks).
    """
    if cells is None:
        cells = sweep_cells(model.cfg.n_layers, n_latents, layer_only=True)
    records = pairs.to_dict("records")
    store = ResultStore(
        out,
        {
            **(settings or {}),
            "checkpoint_sha256": model.checkpoint_sha256,
            "pairs": sorted(str(p) for p in pairs["pair_id"]),
            "cells": [f"{c.hook}|{c.head}|{c.position}" for c in cells],
            "n_latents": n_latents,
            "max_new_tokens": max_new_tokens,
            "generate": generate,
            "method": method,
            "donor": donor,
        },
        overwrite=overwrite,
    )
    rows = store.run(
        records,
        lambda batch: patch_rows(
            model,
            pd.DataFrame(batch),
            cells,
            n_latents=n_latents,
            max_new_tokens=max_new_tokens,
            generate=generate,
            max_rows=max_rows,
            method=method,
            donor=donor,
        ),
        unit_id=lambda r: str(r["pair_id"]),
        batch_size=batch_size,
        desc="patching",
        progress=progress,
        executor=executor,
    )
    return rows, store


# ---------------------------------------------------------------------- chained versus parallel
def trajectory_rows(
    model: CODIModel,
    pairs: pd.DataFrame,
    layers: Sequence[int],
    *,
    n_latents: int = 6,
    max_new_tokens: int = 256,
    max_rows: int = 256,
) -> pd.DataFrame:
    """Chained versus parallel patching of ``blocks.L.hook_resid_post`` for one batch of pairs.

    ``chained(L, k)`` writes the clean activation into thought k only and lets the corrupted run's loop
    compute thoughts k+1.. from the patched state; ``parallel(L, k)`` writes the clean activation into
    every thought k..n at once. For each (layer, start thought k, mode) one row per later thought j >= k:
    ``cos_clean`` / ``cos_corrupted`` (cosine of the patched run's layer-L activation at thought j with
    the clean / corrupted run's), ``fed_cos_clean`` / ``fed_cos_corrupted`` (the same for the thought fed
    at j), and the run's final ``recovery``, ``logit_diff`` and ``kl`` at the answer.

    Every configuration branches off the corrupted run at its start thought (:mod:`codi_lens.branching`):
    one teacher-forced forward per layer gives every configuration's activations and answer logits.
    """
    hooks = [f"blocks.{layer}.hook_resid_post" for layer in layers]
    batch, kept, skipped = prepare_pairs(model, pairs, hooks, n_latents=n_latents, max_new_tokens=max_new_tokens)
    frames = [_skipped_rows(skipped)]
    if batch is None:
        return frames[0]
    corrupted_q = kept["corrupted_question"].tolist()
    corrupted, corrupted_cache = model.run_codi_with_cache(
        corrupted_q, names_filter=hooks, n_latents=n_latents, max_new_tokens=1
    )
    trunk = grow_trunk(model, corrupted_q, n_latents=n_latents)
    clean_tok = batch._clean_tokens
    answers, index = forced_answers(batch.clean_numbers), [n.index for n in batch.clean_numbers]
    names = [f"thought:{k}" for k in range(1, n_latents + 1)]
    for layer in layers:
        hook = f"blocks.{layer}.hook_resid_post"
        clean_acts = _at(batch.clean_cache[hook], batch.clean_positions, names)  # [batch, n, d]
        corrupted_acts = _at(corrupted_cache[hook], corrupted.positions, names)
        configs = [(start, mode) for start in range(1, n_latents + 1) for mode in ("chained", "parallel")]
        recorders = [ActivationRecorder(lambda: model.chunk_context) for _ in configs]
        branches = [
            Branch(
                [
                    *(
                        chained(model, layer, start, clean_acts)
                        if mode == "chained"
                        else parallel(model, layer, range(start, n_latents + 1), clean_acts)
                    ),
                    (hook, recorder),
                ],
                start,
            )
            for (start, mode), recorder in zip(configs, recorders)
        ]
        outputs = run_branches(model, trunk, branches, answers, answer_index=index, max_rows=max_rows)
        for (start, mode), recorder, output in zip(configs, recorders, outputs):
            acts = _at(recorder.tensors()[hook], trunk.layout, names)  # thoughts before start are not recorded
            logits = output.logits[:, 0].float()
            ld = logit_difference(logits, clean_tok, batch.corrupted_tokens)
            recovery = normalised_recovery(ld, batch.ld_corrupted, batch.ld_clean)
            kl = kl_divergence(batch.clean_logits, logits).cpu().numpy()
            for j in range(start, n_latents + 1):
                fed = output.thought_inputs[:, j - start]
                frames.append(
                    pd.DataFrame(
                        {
                            UNIT_COLUMN: kept["pair_id"].to_numpy(),
                            "pair_id": kept["pair_id"].to_numpy(),
                            "layer": layer,
                            "start_thought": start,
                            "mode": mode,
                            "thought": j,
                            "cos_clean": _cos(acts[:, j - 1], clean_acts[:, j - 1]),
                            "cos_corrupted": _cos(acts[:, j - 1], corrupted_acts[:, j - 1]),
                            "fed_cos_clean": _cos(fed, batch.clean_thoughts[:, j - 1]),
                            "fed_cos_corrupted": _cos(fed, corrupted.thought_embeds[:, j - 1]),
                            "logit_diff": ld.cpu().numpy(),
                            "recovery": recovery,
                            "kl": kl,
                            "reason": "",
                        }
                    )
                )
    return pd.concat([f for f in frames if len(f)], ignore_index=True)


def _at(acts: Tensor, positions, names: list[str]) -> Tensor:
    where = positions.resolve(names)
    return torch.stack([acts[i, where[i]] for i in range(acts.shape[0])])


def _cos(a: Tensor, b: Tensor) -> np.ndarray:
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1).cpu().numpy()


def chained(model: CODIModel, layer: int, k: int, clean_acts: Tensor) -> Hooks:
    """Write the clean ``blocks.{layer}.hook_resid_post`` of thought k (``clean_acts[:, k - 1]``, from
    ``[batch, n, d_model]`` clean activations at thoughts 1..n) into thought k only."""
    return _patch_thoughts(model, layer, [k], clean_acts)


def parallel(model: CODIModel, layer: int, thoughts: Sequence[int], clean_acts: Tensor) -> Hooks:
    """Write the clean ``blocks.{layer}.hook_resid_post`` into every thought of ``thoughts`` at once."""
    return _patch_thoughts(model, layer, list(thoughts), clean_acts)


def _patch_thoughts(model, layer: int, thoughts: list[int], clean_acts: Tensor) -> Hooks:
    values = clean_acts[:, [k - 1 for k in thoughts]]
    return replace_at(model, f"blocks.{layer}.hook_resid_post", [f"thought:{k}" for k in thoughts], values)


def clean_thought_activations(model: CODIModel, questions: Sequence[str], layer: int, *, n_latents: int = 6) -> Tensor:
    """``blocks.{layer}.hook_resid_post`` at thoughts 1..n of a clean run, ``[batch, n, d_model]``."""
    hook = f"blocks.{layer}.hook_resid_post"
    result, cache = model.run_codi_with_cache(list(questions), names_filter=hook, n_latents=n_latents, max_new_tokens=1)
    return _at(cache[hook], result.positions, [f"thought:{k}" for k in range(1, n_latents + 1)])
