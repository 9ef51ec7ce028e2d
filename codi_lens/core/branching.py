"""Branching the latent loop: interventions that share the start of a run compute that start once.

A CODI run is a chain of steps under one KV cache: the question, BOT, thoughts 1..n, then the answer
(EOT and the answer tokens). An intervention whose hooks first act at step ``s`` leaves every earlier
step exactly as in the unpatched run. So many interventions run as *branches* of one *trunk*: the
unpatched run is computed once (:func:`grow_trunk`), and each branch starts from the trunk's KV cache
cut before its first step (the cache holds one position per step, in order, so cutting is slicing),
expanded along the batch with one block of rows per branch (:func:`run_branches`).

Branches with the same start run together as blocks of one forward, at most ``max_rows`` rows at a
time: each block's hooks see only the block's rows and a position map of the block's own
(:class:`BlockHook`), so a hook behaves as in its own run. After the loop the answer is teacher-forced
in one chunk, with logits computed only where they are read (one row per example when
``answer_index`` is given); with ``max_new_tokens`` the branch also generates, greedily, each row
leaving the batch at its own EOS (when no hook acts in the answer).

Starts (``Branch.start``): :data:`QUESTION` (-1, the question itself: e.g. a patch at a question
token), 0 (BOT, computed as a chunk of its own), ``k`` (thought k: its fed input and every later
step) and ``n + 1`` (the answer: EOT on). Results agree with one full run per intervention up to
float summation order (tested to 1e-4 in float32).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch
from jaxtyping import Float, Int
from torch import Tensor

from codi_lens.core import loop
from codi_lens.core.hooks import HookFn, PositionalHook
from codi_lens.core.loop import LoopState
from codi_lens.core.model import CODIModel
from codi_lens.core.names import parse_thought_hook
from codi_lens.core.positions import ChunkContext, CODIPositions

#: ``Branch.start`` of an intervention that acts on the question itself (the whole run is recomputed).
QUESTION = -1


@dataclass(frozen=True)
class Branch:
    """One intervention: its ``fwd_hooks`` and the first step they act at.

    Attributes:
        hooks: ``(name, fn)`` pairs, as ``run_codi`` takes them.
        start: :data:`QUESTION`, 0 (BOT), k (thought k) or n + 1 (EOT and the answer). The steps
            before ``start`` are taken from the unpatched run, so a start later than the hooks' first
            effect would silently drop it: thought hooks and positional hooks that act earlier are
            refused; for other hooks the start is the caller's word.
        in_answer: the hooks also act in the answer (implied for start n + 1): they stay live while
            generating, and rows are then not dropped at EOS.
    """

    hooks: Sequence[tuple[str, HookFn]] = ()
    start: int = QUESTION
    in_answer: bool = False

    def acts_in_answer(self, n_latents: int) -> bool:
        """Whether any of its hooks may act while the answer is fed or generated."""
        return bool(self.hooks) and (self.in_answer or self.start > n_latents)


@dataclass
class Trunk:
    """The unpatched run of a batch of questions up to thought ``through``.

    Attributes:
        questions: the questions, in row order.
        tokens, mask: the left-padded questions ``[batch, width]``.
        positions: the run's position map.
        keys, values: per layer, the KV cache over question, BOT and thoughts 1..through,
            ``[batch, width + 1 + through, n_kv_heads, d_head]``.
        thought_inputs: the fed thoughts ``z_1 .. z_{through + 1}``, ``[batch, through + 1, d_model]``
            (the last is ``prj(h_through)``, the input of the next thought).
        latent_states: ``h_0 .. h_through``, ``[batch, through + 1, d_model]``.
    """

    questions: tuple[str, ...]
    tokens: Int[Tensor, "batch width"]
    mask: Int[Tensor, "batch width"]
    positions: CODIPositions
    keys: list[Float[Tensor, "batch cached n_kv_heads d_head"]]
    values: list[Float[Tensor, "batch cached n_kv_heads d_head"]]
    thought_inputs: Float[Tensor, "batch through_plus_1 d_model"]
    latent_states: Float[Tensor, "batch through_plus_1 d_model"]

    @property
    def batch(self) -> int:
        return self.tokens.shape[0]

    @property
    def through(self) -> int:
        return self.thought_inputs.shape[1] - 1

    def serves(self, questions: Sequence[str], n_latents: int, through: int) -> bool:
        """Whether this trunk is the unpatched run of ``questions`` (in this order) with ``n_latents``
        thoughts, reaching thought ``through`` or further."""
        return self.questions == tuple(questions) and self.positions.n_latents == n_latents and self.through >= through

    def rows(self, rows: Sequence[int]) -> Trunk:
        """The trunk of questions ``rows`` only. Their padding stays as it was (every row's values are its
        own: the loop is batch-invariant), so the position map keeps the width."""
        rows = list(rows)
        index = torch.tensor(rows, dtype=torch.long, device=self.tokens.device)
        return Trunk(
            questions=tuple(self.questions[i] for i in rows),
            tokens=self.tokens[index],
            mask=self.mask[index],
            positions=replace(
                self.positions,
                n_pad=[self.positions.n_pad[i] for i in rows],
                answer_lengths=[self.positions.answer_lengths[i] for i in rows],
            ),
            keys=[k[index] for k in self.keys],
            values=[v[index] for v in self.values],
            thought_inputs=self.thought_inputs[index],
            latent_states=self.latent_states[index],
        )

    def cache_before(self, start: int, blocks: int, model: CODIModel, positions: CODIPositions) -> LoopState:
        """A loop state whose KV cache holds the steps before ``start``, repeated ``blocks`` times."""
        if start > self.through + 1:
            raise ValueError(f"the trunk reaches thought {self.through}; a branch at step {start} needs more")
        length = self.tokens.shape[1] + max(start, 0)
        state = loop.new_state(model, self.batch * blocks, positions)
        for entry, keys, values in zip(state.kv_cache.entries, self.keys, self.values):
            entry.past_keys = keys[:, :length].repeat(blocks, 1, 1, 1)
            entry.past_values = values[:, :length].repeat(blocks, 1, 1, 1)
        mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1]).expand(-1, length - self.mask.shape[1])], 1)
        state.kv_cache.previous_attention_mask = mask.repeat(blocks, 1).to(torch.int)
        return state


@torch.no_grad()
def grow_trunk(model: CODIModel, questions: Sequence[str], *, n_latents: int = 6, through: int | None = None) -> Trunk:
    """Run the questions without interventions up to thought ``through`` (default: every thought). A Jacobi
    loop's trunk always holds every thought (its last sweep), whatever ``through`` says."""
    through = n_latents if through is None else through
    if not 0 <= through <= n_latents:
        raise ValueError(f"through must be in 0..{n_latents}, got {through}")
    if model.latent_loop.is_jacobi:
        through = n_latents
    tokens, mask = loop.prepare(model, questions, n_latents)
    positions = loop.run_positions(model, mask, n_latents, [1] * len(questions))
    state, last = loop.run_latents(model, tokens, mask, positions, through=through)
    return Trunk(
        questions=tuple(questions),
        tokens=tokens,
        mask=mask,
        positions=positions,
        keys=[entry.past_keys for entry in state.kv_cache.entries],
        values=[entry.past_values for entry in state.kv_cache.entries],
        thought_inputs=torch.stack([*state.thought_embeds, last], dim=1),
        latent_states=torch.stack(state.latent_states, dim=1),
    )


class BlockHook:
    """Applies ``fn`` to rows ``start .. start + size - 1`` only, inside a position context of those
    rows (so positional hooks resolve against the block's own position map)."""

    def __init__(self, model: CODIModel, fn: HookFn, start: int, size: int, positions: CODIPositions):
        self.scope, self.fn, self.start, self.size, self.positions = model.chunk_scope, fn, start, size, positions

    def __call__(self, acts: Tensor, hook) -> Tensor:
        rows = acts[self.start : self.start + self.size]
        if not self.scope.active:  # thought and projection hooks fire between chunks
            out = self.fn(rows, hook)
        else:
            with self.scope.scoped(ChunkContext(self.scope.current.span, self.positions, self.scope.current.sweep)):
                out = self.fn(rows, hook)
        if out is None or out is rows:
            return acts
        new = acts.clone()
        new[self.start : self.start + self.size] = out
        return new


@dataclass
class BranchOutput:
    """What one branch produced.

    Attributes:
        logits: teacher-forced answer logits, ``[batch, 1 (or k), d_vocab]`` at ``answer_index`` or
            ``[batch, answer_pos, d_vocab]`` (row j predicts answer token j); None without answers.
        answer_tokens: generated tokens per example (with ``max_new_tokens``), else None.
        thought_inputs: the thoughts the branch fed from its start on, ``[batch, n_fed, d_model]``.
    """

    logits: Float[Tensor, "batch n_rows d_vocab"] | None
    answer_tokens: list[list[int]] | None = None
    thought_inputs: Float[Tensor, "batch n_fed d_model"] | None = field(default=None, repr=False)


@torch.no_grad()
def run_branches(
    model: CODIModel,
    trunk: Trunk,
    branches: Sequence[Branch],
    answers: Sequence[Sequence[int]] | None = None,
    *,
    answer_index: Sequence[int] | None = None,
    max_new_tokens: int = 0,
    max_rows: int = 256,
) -> list[BranchOutput]:
    """Every branch on the trunk's questions, branches with the same start batched together.

    Args:
        answers: per example, the answer tokens to teacher-force (``[EOT] + answer[:-1]`` is fed), or
            None to skip teacher forcing.
        answer_index: per example, the answer row whose logits are wanted (e.g. the answer number's
            index), or a list of k rows per example; default: every row.
        max_new_tokens: also generate up to this many tokens per branch (0: do not generate).
        max_rows: at most this many rows (branches x examples) in one forward; a group with more
            branches is split (memory grows with rows x sequence, and with rows x vocabulary when
            generating).
    Returns one :class:`BranchOutput` per branch, in order.
    """
    if answers is None and max_new_tokens < 1:
        raise ValueError("give answers to teacher-force, max_new_tokens to generate, or both")
    if answers is not None and len(answers) != trunk.batch:
        raise ValueError(f"give one answer per question ({trunk.batch} questions, {len(answers)} answers)")
    n = trunk.positions.n_latents
    for i, branch in enumerate(branches):
        if not QUESTION <= branch.start <= n + 1:
            raise ValueError(f"branch {i} starts at step {branch.start}; steps run from {QUESTION} to {n + 1}")
    starts = [effective_start(model, b.start, n) for b in branches]
    per_forward = max(1, max_rows // trunk.batch)
    outputs: dict[int, BranchOutput] = {}
    for start in sorted(set(starts)):
        group = [i for i, s in enumerate(starts) if s == start]
        for first in range(0, len(group), per_forward):
            chunk = group[first : first + per_forward]
            results = _run_group(
                model, trunk, [branches[i] for i in chunk], start, answers, answer_index, max_new_tokens
            )
            outputs.update(zip(chunk, results))
    return [outputs[i] for i in range(len(branches))]


def _run_group(
    model: CODIModel,
    trunk: Trunk,
    group: list[Branch],
    start: int,
    answers: Sequence[Sequence[int]] | None,
    answer_index: Sequence[int] | None,
    max_new_tokens: int,
) -> list[BranchOutput]:
    """Branches with one start as blocks of one batch."""
    size, blocks, n = trunk.batch, len(group), trunk.positions.n_latents
    lengths = [len(a) for a in answers] if answers is not None else [max_new_tokens] * size
    positions = replace(trunk.positions, answer_lengths=lengths)
    wide = replace(positions, n_pad=positions.n_pad * blocks, answer_lengths=lengths * blocks)
    for branch in group:
        loop.check_hooks(model, branch.hooks, positions)
        _check_start(branch, positions)
    block_hooks = [
        (name, BlockHook(model, fn, c * size, size, positions)) for c, b in enumerate(group) for name, fn in b.hooks
    ]
    hooks_in_answer = any(b.acts_in_answer(n) for b in group)
    logits = generated = None
    with model.hooks(fwd_hooks=block_hooks, reset_hooks_end=True):
        state = run_loop_from(model, trunk, start, blocks, wide)
        if answers is not None:
            logits = _teacher_force(model, state, answers, answer_index, blocks, wide, keep_cache=max_new_tokens > 0)
        if max_new_tokens and hooks_in_answer:
            generated = loop.greedy_decode(model, state, max_new_tokens)
    if max_new_tokens and not hooks_in_answer:  # no hook acts in the answer: rows leave the batch at EOS
        generated = loop.greedy_decode(model, state, max_new_tokens, compact=True)
    fed = torch.stack(state.thought_embeds, 1) if state.thought_embeds else None
    return [
        BranchOutput(
            logits=None if logits is None else logits[c * size : (c + 1) * size],
            answer_tokens=None if generated is None else generated[c * size : (c + 1) * size],
            thought_inputs=None if fed is None else fed[c * size : (c + 1) * size],
        )
        for c in range(blocks)
    ]


def effective_start(model: CODIModel, start: int, n_latents: int) -> int:
    """The step a branch is computed from: its own, except in a Jacobi loop, where a branch at any thought
    recomputes every sweep (a thought of sweep s depends on every thought of sweep s - 1), so starts 1..n are 1."""
    if model.latent_loop.is_jacobi and 1 <= start <= n_latents:
        return 1
    return start


def _check_start(branch: Branch, positions: CODIPositions) -> None:
    """Refuse a branch whose thought hooks or positional hooks act before its start (the trunk's
    unpatched values would stand there). Other hooks cannot be checked: their start is the caller's word."""
    if branch.start == QUESTION:
        return
    first = positions.bot + branch.start  # the first position the branch computes
    for name, fn in branch.hooks:
        thought = parse_thought_hook(name) if isinstance(name, str) else None
        if thought is not None and thought[0] < branch.start:
            raise ValueError(f"{name} acts before the branch's start (step {branch.start}); start it at {thought[0]}")
        if isinstance(fn, PositionalHook) and int(fn.resolve(positions).min()) < first:
            raise ValueError(
                f"the positional hook on {name} acts at {fn.positions}, before the branch's start (step {branch.start})"
            )


def run_loop_from(model: CODIModel, trunk: Trunk, start: int, blocks: int, wide: CODIPositions) -> LoopState:
    """The loop from step ``start`` to the last thought, for ``blocks`` copies of the trunk's rows, under
    whatever hooks are attached (``wide``: the position map of all the rows). Returns the loop state
    (its KV cache ends after thought n); the caller feeds the answer."""
    n = trunk.positions.n_latents
    if start == QUESTION:
        state, _ = loop.run_latents(model, trunk.tokens.repeat(blocks, 1), trunk.mask.repeat(blocks, 1), wide)
        return state
    state = trunk.cache_before(start, blocks, model, wide)
    if start == 0:  # BOT as a chunk of its own after the question's cached keys
        rows = trunk.batch * blocks
        bot = torch.full((rows, 1), model.codi_tokens.bot, dtype=torch.long, device=model.cfg.device)
        final, _ = model.forward_embeds(
            model.token_embeds(bot), torch.ones_like(bot), state.kv_cache, positions=wide, logits_at="none"
        )
        z = loop.project(model, 0, final[:, -1], state)
        _run_thoughts_from(model, state, z, 1)
    elif start <= n:
        _run_thoughts_from(model, state, trunk.thought_inputs[:, start - 1].repeat(blocks, 1), start)
    return state


def _run_thoughts_from(model: CODIModel, state: LoopState, z: Float[Tensor, "rows d_model"], first: int) -> None:
    """Thoughts ``first..n`` fed from ``z`` (a Jacobi loop: every sweep, from ``z = prj(h_0)``, first being 1)."""
    if model.latent_loop.is_jacobi:
        loop.run_sweeps(model, state, z, keep_logits=False)
    else:
        loop.run_thoughts(model, state, z, keep_logits=False, first=first)


def _teacher_force(
    model: CODIModel,
    state: LoopState,
    answers: Sequence[Sequence[int]],
    answer_index: Sequence[int] | None,
    blocks: int,
    wide: CODIPositions,
    *,
    keep_cache: bool,
) -> Tensor:
    """Feed ``[EOT] + answer[:-1]`` for every row; logits at ``answer_index`` or at every row. With
    ``keep_cache`` the KV cache is left as it was (generation follows from the end of the loop)."""
    answer_tokens, answer_mask = model.tokenize_answers(list(answers))
    opening = loop.answer_opening(model)
    fed, fed_mask = loop.teacher_forced_input(opening, answer_tokens.repeat(blocks, 1), answer_mask.repeat(blocks, 1))
    rows = loop.answer_rows(opening, answer_tokens.shape[1], len(answers), answer_index)
    logits_at = rows.repeat(blocks, 1)
    with loop.cache_kept(state.kv_cache, keep_cache):
        _, logits = model.forward_embeds(
            model.token_embeds(fed), fed_mask, state.kv_cache, positions=wide, logits_at=logits_at
        )
    return logits
