"""Named positions of a CODI run, and the chunk of the run being computed.

Position convention (used everywhere in codi_lens). For a batch whose questions are padded on the
left to ``L`` tokens, the CODI sequence is::

    position:  0 .. L-1      L     L+1 .. L+n     L+n+1   L+n+2 ..
    content:   question      BOT   thought 1..n   EOT     answer tokens
    name:      question:j    bot   thought:k      eot     answer:j

*Thought k* (1-based, ``k = 1..n``) is the position fed the k-th continuous thought ``z_k``; in
tables ``thought = 0`` is BOT (``"thought:0"`` is accepted as a name for ``"bot"``). At every index
``k = 0..n`` the model produces ``h_k``, the post-final-norm hidden state at that position (HF
``hidden_states[-1]``), and ``prj(h_k)``, fed back at thought ``k + 1`` (``prj(h_n)`` is computed
and discarded, as upstream does). ``answer:j`` is the position holding answer token ``j`` once it is
fed back; the logits that predict answer token ``j`` come from the position before it (EOT for
``j = 0``). The last generated token (usually EOS) is never fed, so it has no position.
``question:j`` counts each example's own question tokens from its first real token (``j >= 0``,
BOS included where the tokenizer adds one), or back from BOT (``question:-1`` is the last question
token); with left padding ``question:0`` sits at a different absolute position in each example.

A loop with the Jacobi schedule (PCCoT) computes the thought positions once per sweep ``s = 0..S``; the
keys and values the answer reads are the last sweep's. There ``"thought:k"`` (and any position in the
thought span) means thought k at the last sweep, and ``"thought:k@sweep:s"`` thought k at sweep s
(:meth:`CODIPositions.sweep_of`); a chunk of a sweep publishes its sweep, and a positional hook acts only
at the sweep its position names. Caches recorded over a Jacobi run hold the last sweep at those positions.
A method with an answer prompt (PCCoT's ``"The answer is:"``) feeds it after EOT: its tokens sit at
``eot + 1 ..``, and ``answer:0`` after them.

Named positions are resolved per run (:meth:`CODIPositions.resolve`), so a clean and a corrupted
batch padded to different widths address the same thought with the same name. Integer positions are
absolute and shared by the batch.

Inside the loop the model runs in chunks under a KV cache (question + BOT, then one position at a
time), so an activation seen by a TransformerLens hook covers only the chunk being computed. The run
publishes each chunk's absolute positions and the run's position map as a :class:`ChunkContext`
through the model's :class:`ChunkScope` (``model.chunk_scope``): set for that chunk only and restored
in ``finally`` when it ends. A positional hook (:mod:`codi_lens.core.hooks`) reads it to find its
positions in the chunk. Activations that cover every cached position (rotated keys) are the
exception; :mod:`codi_lens.core.names` lists them.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from codi_lens.core.errors import PositionContextError, PositionError
from codi_lens.core.names import spans_every_cached_position

#: A position of a run: a name (``"bot"``, ``"thought:3"``, ``"eot"``, ``"answer:0"``, ``"question:-1"``)
#: resolved per run, or an absolute index shared by the batch.
Position = int | str


@dataclass
class CODIPositions:
    """Absolute positions in a left-padded CODI batch (see the module docstring for the convention).

    Attributes:
        n_pad: left-padding tokens before each example's question, ``[batch]``.
        bot: position of BOT. ``thoughts[k-1]`` is thought k. ``eot``: position of EOT.
        answer_start: position holding answer token 0 (``answer:0``).
        answer_lengths: answer tokens per example (generated or teacher-forced, EOS included). Before
            a run starts this is the budget. Answer token ``j`` has a position for ``j < length - 1``.
        n_sweeps: the last sweep's index for a Jacobi loop (sweeps ``0..n_sweeps``); 0 for a sequential one.
    """

    n_pad: list[int]
    bot: int
    thoughts: list[int]
    eot: int
    answer_start: int
    answer_lengths: list[int]
    n_sweeps: int = 0

    def __post_init__(self) -> None:
        if len(self.answer_lengths) != len(self.n_pad):
            raise ValueError(
                f"a position map needs one answer length per example: {len(self.n_pad)} examples, "
                f"{len(self.answer_lengths)} answer lengths"
            )

    @property
    def n_latents(self) -> int:
        return len(self.thoughts)

    @property
    def n_answer_positions(self) -> int:
        """Answer positions that exist in the longest example (answer tokens that were fed back)."""
        return max(0, max(self.answer_lengths, default=0) - 1)

    def for_example(self, i: int) -> dict[str, object]:
        """Named positions of example ``i``: question span, bot, thought_1.., eot, answer positions."""
        named: dict[str, object] = {"question": list(range(self.n_pad[i], self.bot)), "bot": self.bot}
        named.update({f"thought_{k}": p for k, p in enumerate(self.thoughts, start=1)})
        named["eot"] = self.eot
        named["answer"] = list(range(self.answer_start, self.answer_start + max(0, self.answer_lengths[i] - 1)))
        return named

    def describe(self) -> str:
        """The run's range in words, for error messages."""
        thoughts = (
            f"thoughts 1..{self.n_latents} at {self.thoughts[0]}..{self.thoughts[-1]}"
            if self.thoughts
            else "no thoughts"
        )
        last = self.answer_start + self.n_answer_positions - 1
        answers = (
            f"answer:0..{self.n_answer_positions - 1} at {self.answer_start}..{last}"
            if last >= self.answer_start
            else "no answer positions"
        )
        return f"bot {self.bot}, {thoughts}, eot {self.eot}, {answers}"

    def resolve(self, positions: Sequence[Position]) -> Int[Tensor, "batch n"]:
        """Absolute position of each named or integer position, per example: ``[batch, len(positions)]``.

        Raises :class:`PositionError` naming the run's range when a position lies outside the run, and
        when two entries land on the same position of an example.
        """
        if isinstance(positions, (str, int)):
            raise TypeError("positions must be a list, e.g. ['thought:3'] or [12]")
        columns = [self._resolve_one(split_sweep(p)[0]) for p in positions]
        for p in positions:
            self.sweep_of(p)  # a sweep named where there is none is refused here
        table = torch.stack(columns, dim=1) if columns else torch.zeros((len(self.n_pad), 0), dtype=torch.long)
        for row in table.tolist():
            if len(set(row)) != len(row):
                raise PositionError(f"positions {list(positions)} select the same position twice ({row})")
        return table

    def sweep_of(self, spec: Position) -> int | None:
        """The sweep at which ``spec`` is addressed: for a Jacobi run and a position in the thought span, the
        sweep it names (``"thought:3@sweep:1"``) or else the last; None for any other position or run.

        Raises :class:`PositionError` for a sweep outside ``0..n_sweeps``, or named in a sequential run or
        outside the thought span."""
        base, sweep = split_sweep(spec)
        in_span = bool(self.thoughts) and all(
            self.thoughts[0] <= int(p) <= self.thoughts[-1] for p in self._resolve_one(base).tolist()
        )
        if sweep is not None and not (self.n_sweeps and in_span):
            where = "this run's loop has no sweeps" if not self.n_sweeps else f"{base!r} is not a thought position"
            raise PositionError(f"{spec!r} names a sweep, but {where}")
        if sweep is not None and not 0 <= sweep <= self.n_sweeps:
            raise PositionError(f"{spec!r} is outside this run: its sweeps are 0..{self.n_sweeps}")
        if not (self.n_sweeps and in_span):
            return None
        return self.n_sweeps if sweep is None else sweep

    def _resolve_one(self, spec: Position) -> Int[Tensor, " batch"]:
        batch = len(self.n_pad)
        last = self.answer_start + self.n_answer_positions - 1
        if isinstance(spec, bool) or not isinstance(spec, (int, str)):
            raise PositionError(f"a position is an int or a name like 'thought:3', not {spec!r}")
        if isinstance(spec, int):
            if not 0 <= spec <= max(last, self.eot):
                raise PositionError(
                    f"position {spec} is outside this run (0..{max(last, self.eot)}; {self.describe()})"
                )
            return torch.full((batch,), spec, dtype=torch.long)
        name, _, index = spec.partition(":")
        if name in ("bot", "eot") and not index:
            return torch.full((batch,), self.bot if name == "bot" else self.eot, dtype=torch.long)
        if name not in ("thought", "answer", "question") or not re.fullmatch(r"-?\d+", index):
            raise PositionError(
                f"unknown position name {spec!r}: use 'bot', 'thought:k', 'eot', 'answer:j' or 'question:j'"
            )
        j = int(index)
        if name == "thought":
            if not 0 <= j <= self.n_latents:
                raise PositionError(
                    f"{spec!r} is outside this run: it has thoughts 1..{self.n_latents} ({self.describe()})"
                )
            return torch.full((batch,), self.bot + j, dtype=torch.long)
        if name == "answer":
            if not 0 <= j < self.n_answer_positions:
                raise PositionError(f"{spec!r} is outside this run ({self.describe()})")
            return torch.full((batch,), self.answer_start + j, dtype=torch.long)
        lengths = [self.bot - pad for pad in self.n_pad]
        if not -min(lengths) <= j < min(lengths):
            raise PositionError(f"{spec!r} is outside the shortest question ({min(lengths)} tokens)")
        if j < 0:
            return torch.full((batch,), self.bot + j, dtype=torch.long)
        return torch.as_tensor(self.n_pad, dtype=torch.long) + j


_SWEEP_SUFFIX = re.compile(r"^(.+)@sweep:(-?\d+)$")


def split_sweep(spec: Position) -> tuple[Position, int | None]:
    """``("thought:3", 2)`` for ``"thought:3@sweep:2"``; ``(spec, None)`` for a position naming no sweep."""
    match = _SWEEP_SUFFIX.match(spec) if isinstance(spec, str) else None
    return (spec, None) if match is None else (match.group(1), int(match.group(2)))


@dataclass(frozen=True)
class ChunkContext:
    """What a hook may know about the chunk being computed.

    Attributes:
        span: absolute positions of the chunk's new tokens, ``[n_new]``, contiguous.
        positions: the run's position map (answer lengths are the budget while generating).
        sweep: the sweep this chunk computes, in a Jacobi loop's thought span; None for every other chunk.
    """

    span: Int[Tensor, " n_new"]
    positions: CODIPositions
    sweep: int | None = None

    @property
    def is_final(self) -> bool:
        """Whether what this chunk computes stays in the run: any chunk but a Jacobi sweep before the last."""
        return self.sweep is None or self.sweep == self.positions.n_sweeps

    def reaches(self, position: Position) -> bool:
        """Whether this chunk computes ``position`` at the sweep it is addressed at (always, outside sweeps)."""
        return self.sweep is None or self.positions.sweep_of(position) in (None, self.sweep)

    @property
    def start(self) -> int:
        return int(self.span[0])

    def index_in_chunk(self, position: Position) -> Int[Tensor, " batch"]:
        """Where the named (or absolute) ``position`` of each example sits among this chunk's new
        positions (its index along the activation's position axis), or -1 where it is outside the chunk."""
        wanted = self.positions.resolve([position])[:, 0]  # [batch]
        offset = wanted - self.start
        inside = (offset >= 0) & (offset < len(self.span)) & self.reaches(position)
        return torch.where(inside, offset, torch.full_like(offset, -1))

    def positions_of(self, hook_name: str) -> Int[Tensor, " pos"]:
        """Absolute positions covered by the position axis of ``hook_name`` in this chunk."""
        if spans_every_cached_position(hook_name):
            return torch.arange(int(self.span[-1]) + 1)
        return self.span


class ChunkScope:
    """The chunk being computed, published to hooks for exactly that chunk.

    A run enters :meth:`scoped` around every chunk it computes; hooks read :attr:`current`. The previous
    context (an outer run's, or none) comes back in ``finally``, so nothing outlives the chunk.
    """

    def __init__(self) -> None:
        self._context: ChunkContext | None = None

    @property
    def active(self) -> bool:
        """Whether a chunk is being computed (thought and projection hooks fire between chunks)."""
        return self._context is not None

    @property
    def current(self) -> ChunkContext:
        """The chunk being computed; :class:`PositionContextError` outside a CODI run."""
        if self._context is None:
            raise PositionContextError(
                "a positional hook fired outside a CODI run: positions are known only inside run_codi, "
                "run_codi_with_cache, score_answers and generate_explicit"
            )
        return self._context

    @contextmanager
    def scoped(self, context: ChunkContext) -> Iterator[ChunkContext]:
        """Publish ``context`` for the ``with`` block; the previous one is restored after it, always."""
        outer, self._context = self._context, context
        try:
            yield context
        finally:
            self._context = outer


def gather_at(acts: Float[Tensor, "batch pos *rest"], where: Int[Tensor, "batch n"]) -> Float[Tensor, "batch n *rest"]:
    """Each example's own positions of a ``[batch, pos, ...]`` activation: ``out[i, j] = acts[i, where[i, j]]``
    (positions resolved per example, e.g. by :meth:`CODIPositions.resolve`)."""
    rows = torch.arange(acts.shape[0], device=acts.device)[:, None]
    return acts[rows, where.to(acts.device)]
