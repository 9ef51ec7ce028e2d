"""Hook names for continuous thoughts, named positions, and hooks that act at chosen positions.

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

Named positions are resolved per run (:meth:`CODIPositions.resolve`), so a clean and a corrupted
batch padded to different widths address the same thought with the same name. Integer positions are
absolute and shared by the batch.

Hook points, one per step, named like TransformerLens' (``thought.{k}.hook_*``):

- ``thought.{k}.hook_input``       (k = 1..n) the embedding fed at thought k        ``[batch, d_model]``
- ``thought.{k}.hook_hidden``      (k = 0..n) ``h_k``, what the projection consumes ``[batch, d_model]``
- ``thought.{k}.hook_projection``  (k = 0..n) ``prj(h_k)``                          ``[batch, d_model]``

``thought.{k}.hook_input`` receives ``thought.{k-1}.hook_projection`` unless a hook changes it.
The projection head itself has hook points ``prj.hook_in``, ``prj.hook_mid`` (after GELU) and
``prj.hook_out``, which fire at every step.

Inside the loop the model runs in chunks under a KV cache (question + BOT, then one position at a
time), so an activation seen by a TransformerLens hook covers only the chunk being computed. The run
publishes each chunk's absolute positions and the run's position map as a :class:`ChunkContext`
(``model.chunk_context``), set for that chunk only and restored when it ends; a
:class:`PositionalHook` reads it to find its positions in the chunk. Activations listed in
``FULL_SPAN_HOOKS`` (rotated keys) cover every cached position, not only the chunk's.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens.hook_points import HookPoint

if TYPE_CHECKING:
    from codi_lens.model import CODIModel

ThoughtHookKind = Literal["input", "hidden", "projection"]
THOUGHT_HOOK_KINDS: tuple[ThoughtHookKind, ...] = ("input", "hidden", "projection")
_THOUGHT_HOOK = re.compile(r"^thought\.(\d+)\.hook_(input|hidden|projection)$")

#: Activations whose position axis spans every cached position ``0..last`` at each chunk (rotary keys
#: are re-rotated over the whole cache), rather than only the chunk's new positions.
FULL_SPAN_HOOKS = ("attn.hook_rot_k",)

HookFn = Callable[[Tensor, HookPoint], Tensor | None]
#: ``transform(acts, hook, which)``: ``acts`` is ``[batch, n_here, ...]`` (the selected positions moved
#: to axis 1), ``which`` indexes the positions the hook was given (``[n_here]``, in the caller's order).
PositionTransform = Callable[[Tensor, HookPoint, Int[Tensor, " n_here"]], Tensor]
Position = int | str


class PositionError(ValueError):
    """A position or thought that the run does not reach, or an ill-formed position name."""


class PositionContextError(RuntimeError):
    """A positional hook fired outside a CODI run, where positions are not known."""


def thought_hook_name(k: int, kind: ThoughtHookKind = "hidden") -> str:
    """Name of the hook point of thought step ``k`` (``0`` = BOT), e.g. ``thought.3.hook_hidden``."""
    if kind not in THOUGHT_HOOK_KINDS:
        raise ValueError(f"kind must be one of {THOUGHT_HOOK_KINDS}, got {kind!r}")
    if k < 0 or (kind == "input" and k == 0):
        raise ValueError(f"no {kind!r} hook at thought {k}: inputs are k >= 1, hidden/projection k >= 0")
    return f"thought.{k}.hook_{kind}"


def parse_thought_hook(name: str) -> tuple[int, ThoughtHookKind] | None:
    """``(k, kind)`` of a thought hook name such as ``thought.3.hook_input``; None for other names."""
    match = _THOUGHT_HOOK.match(name)
    return None if match is None else (int(match.group(1)), match.group(2))  # type: ignore[return-value]


def position_axis(hook_name: str) -> int | None:
    """The sequence-position axis of an activation, or None for per-step thought/projection hooks.

    Attention scores and patterns are ``[batch, head, query_pos, key_pos]`` (axis 2 = query); the
    other TransformerLens activations are ``[batch, pos, ...]`` (axis 1).
    """
    if hook_name.startswith(("thought.", "prj.")):
        return None
    if hook_name.endswith(("hook_pattern", "hook_attn_scores")):
        return 2
    return 1


def spans_every_cached_position(hook_name: str) -> bool:
    """Whether the activation covers all cached positions (see ``FULL_SPAN_HOOKS``)."""
    return hook_name.endswith(FULL_SPAN_HOOKS)


@dataclass
class CODIPositions:
    """Absolute positions in a left-padded CODI batch (see the module docstring for the convention).

    Attributes:
        n_pad: left-padding tokens before each example's question, ``[batch]``.
        bot: position of BOT. ``thoughts[k-1]`` is thought k. ``eot``: position of EOT.
        answer_start: position holding answer token 0 (``answer:0``).
        answer_lengths: answer tokens per example (generated or teacher-forced, EOS included). Before
            a run starts this is the budget. Answer token ``j`` has a position for ``j < length - 1``.
    """

    n_pad: list[int]
    bot: int
    thoughts: list[int]
    eot: int
    answer_start: int
    answer_lengths: list[int]

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
        columns = [self._resolve_one(p) for p in positions]
        table = torch.stack(columns, dim=1) if columns else torch.zeros((len(self.n_pad), 0), dtype=torch.long)
        for row in table.tolist():
            if len(set(row)) != len(row):
                raise PositionError(f"positions {list(positions)} select the same position twice ({row})")
        return table

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


@dataclass(frozen=True)
class ChunkContext:
    """What a hook may know about the chunk being computed.

    Attributes:
        positions: absolute positions of the chunk's new tokens, ``[n_new]``, contiguous.
        layout: the run's position map (answer lengths are the budget while generating).
    """

    positions: Int[Tensor, " n_new"]
    layout: CODIPositions

    @property
    def start(self) -> int:
        return int(self.positions[0])

    def index_in_chunk(self, position: Position) -> Int[Tensor, " batch"]:
        """Where the named (or absolute) ``position`` of each example sits among this chunk's new
        positions (its index along the activation's position axis), or -1 where it is outside the chunk."""
        wanted = self.layout.resolve([position])[:, 0]  # [batch]
        offset = wanted - int(self.positions[0])
        inside = (offset >= 0) & (offset < len(self.positions))
        return torch.where(inside, offset, torch.full_like(offset, -1))

    def positions_of(self, hook_name: str) -> Int[Tensor, " pos"]:
        """Absolute positions covered by the position axis of ``hook_name`` in this chunk."""
        if spans_every_cached_position(hook_name):
            return torch.arange(int(self.positions[-1]) + 1)
        return self.positions


class PositionalHook:
    """A hook that applies ``transform`` only at the given positions (names or absolute ints).

    Positions are resolved against each run's position map, so ``"thought:3"`` follows the thought
    when batches are padded to different widths. ``transform(acts, hook, which)`` receives the
    activation at the selected positions, ``[batch, n_here, ...]`` in the order the positions were
    given (``which`` indexes them), and returns a tensor of the same shape. Every other position is
    passed through untouched. Rotated keys (``hook_rot_k``) cover every cached position, so for them
    the edit is applied at each chunk and holds for all later queries, as in one full pass.

    Raises :class:`PositionContextError` if it fires outside a CODI run, and :class:`PositionError`
    (from the run's checks, before anything runs) for positions the run does not reach.
    """

    def __init__(self, model: CODIModel, positions: Sequence[Position], transform: PositionTransform):
        if isinstance(positions, (str, int)):
            raise TypeError("positions must be a list, e.g. ['thought:3'] or [12]")
        self.model = model
        self.positions = list(positions)
        if len(set(self.positions)) != len(self.positions):
            raise PositionError(f"positions {self.positions} name a position twice")
        self.transform = transform
        self._resolved: tuple[CODIPositions, Tensor] | None = None

    def resolve(self, layout: CODIPositions) -> Int[Tensor, "batch n"]:
        """Absolute positions per example (memoised for the last layout seen)."""
        if self._resolved is None or self._resolved[0] is not layout:
            self._resolved = (layout, layout.resolve(self.positions))
        return self._resolved[1]

    def __call__(self, acts: Tensor, hook: HookPoint) -> Tensor:
        axis = position_axis(hook.name)
        if axis is None:
            raise ValueError(f"{hook.name} has no position axis; hook it directly instead")
        context = self.model.chunk_context
        covered = context.positions_of(hook.name)
        if acts.shape[axis] != len(covered):
            raise RuntimeError(
                f"{hook.name}: activation has {acts.shape[axis]} positions on axis {axis} but the chunk covers "
                f"{len(covered)} ({int(covered[0])}..{int(covered[-1])})"
            )
        wanted = self.resolve(context.layout).to(acts.device)
        first, last = int(covered[0]), int(covered[-1])
        inside = (wanted >= first) & (wanted <= last)
        if bool((inside.any(0) & ~inside.all(0)).any()):
            raise PositionError(f"{self.positions} fall in different chunks for different examples on {hook.name}")
        which = torch.nonzero(inside.all(0)).flatten()
        if which.numel() == 0:
            return acts
        moved = acts.movedim(axis, 1)
        index = (wanted[:, which] - first).reshape(wanted.shape[0], -1, *([1] * (moved.dim() - 2)))
        index = index.expand(-1, -1, *moved.shape[2:])
        replaced = self.transform(moved.gather(1, index), hook, which.cpu())
        if replaced.shape != index.shape:
            raise ValueError(f"transform returned {tuple(replaced.shape)} for {tuple(index.shape)} at {hook.name}")
        return moved.scatter(1, index, replaced.to(acts.dtype)).movedim(1, axis)


def positional_hook(model: CODIModel, positions: Sequence[Position], transform: PositionTransform) -> PositionalHook:
    """A :class:`PositionalHook`: ``transform`` applied only at ``positions`` (names or absolute ints)."""
    return PositionalHook(model, positions, transform)


def replace_at_positions(
    model: CODIModel, positions: Sequence[Position], values: Float[Tensor, "batch n_pos *rest"]
) -> PositionalHook:
    """A hook writing ``values[:, i]`` at ``positions[i]``, in the order given (duplicates refused)."""
    positions = list(positions)
    if values.shape[1] != len(positions):
        raise ValueError(f"values has {values.shape[1]} positions on axis 1 but {len(positions)} positions were given")

    def transform(acts: Tensor, hook: HookPoint, which: Tensor) -> Tensor:
        return values.index_select(1, which.to(values.device)).to(device=acts.device, dtype=acts.dtype)

    return PositionalHook(model, positions, transform)


def zero_at_positions(model: CODIModel, positions: Sequence[Position]) -> PositionalHook:
    """A hook zeroing the activation at the given positions."""
    return PositionalHook(model, positions, lambda acts, hook, which: torch.zeros_like(acts))
