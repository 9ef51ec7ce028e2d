"""Sites: the one way codi_lens says *where* in the latent loop something is read, patched or trained.

A :class:`Site` is a hook point, the named position it is read at (see :mod:`codi_lens.core.positions`) and,
for per-head activations, one head:

- ``Site("thought.3.hook_hidden")``: a thought hook; its position follows from the name (``"thought:3"``;
  ``thought.0.*`` is ``"bot"``);
- ``Site("blocks.1.hook_resid_post", "thought:2")``: a hook with a position axis, at thought 2's position;
- ``Site("blocks.0.attn.hook_z", "eot", head=1)``: one head's output at EOT.

Activation datasets and SAEs belong to a site, patching sweeps patch sites, pathways run between sites.
A caller may give a position a meaning of its own (patching's spans ``"thoughts"`` and ``"latents"``, the
changed number's tokens ``"changed"``); the core resolves only the standard names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import total_ordering

from codi_lens.core.errors import PositionError
from codi_lens.core.names import act_name, parse_act_name, parse_thought_hook, thought_hook_name

_THOUGHT_POSITION = re.compile(r"^thought:(\d+)$")


def thought_position(k: int) -> str:
    """The named position of step k: ``"bot"`` for 0, ``"thought:k"`` for a thought."""
    return "bot" if k == 0 else f"thought:{k}"


@total_ordering
@dataclass(frozen=True, eq=True)
class Site:
    """One place of the latent loop (see the module docstring).

    Attributes:
        hook: the hook point's name.
        position: the named position (filled in from the name for a thought hook).
        head: one attention head of a per-head activation, or None.
    """

    hook: str
    position: str | None = None
    head: int | None = None

    def __post_init__(self) -> None:
        thought = parse_thought_hook(self.hook)
        if thought is not None:
            own = thought_position(thought[0])
            if self.position is None:
                object.__setattr__(self, "position", own)
            elif self.position != own:
                raise PositionError(f"{self.hook} is read at {own}, not at {self.position!r}")
        elif self.position is None:
            raise PositionError(
                f"{self.hook} has a position axis: name the position, e.g. Site({self.hook!r}, 'thought:3')"
            )

    @classmethod
    def of(cls, kind: str, layer: int | None, position: str, head: int | None = None) -> Site:
        """A site by TransformerLens kind and layer (``of("resid_post", 1, "thought:2")``); the kind
        ``"thought_input"`` (layer None) is the thought fed at ``position``."""
        if kind == "thought_input":
            match = _THOUGHT_POSITION.match(position)
            if match is None:
                raise PositionError(f"a fed thought is at 'thought:k', not {position!r}")
            return cls(thought_hook_name(int(match.group(1)), "input"), position, head)
        return cls(act_name(kind, layer), position, head)

    @classmethod
    def at_thought(cls, hook: str, k: int) -> Site:
        """``hook`` read at step k (0 = BOT); for a thought hook, ``hook`` must be step k's own."""
        return cls(hook, thought_position(k))

    @property
    def is_thought_hook(self) -> bool:
        return parse_thought_hook(self.hook) is not None

    @property
    def thought(self) -> int | None:
        """0 for BOT, k for thought k, None for other positions."""
        if self.position == "bot":
            return 0
        match = _THOUGHT_POSITION.match(self.position or "")
        return None if match is None else int(match.group(1))

    @property
    def kind(self) -> str:
        """``resid_post``, ``attn_out``, ``z``, ... for a block's hook; ``thought_input``, ``thought_hidden`` or
        ``thought_projection`` for a thought hook; else the hook name itself."""
        thought = parse_thought_hook(self.hook)
        if thought is not None:
            return f"thought_{thought[1]}"
        parsed = parse_act_name(self.hook)
        return self.hook if parsed is None else parsed[1]

    @property
    def layer(self) -> int | None:
        """The block of a ``blocks.L.*`` hook, else None."""
        parsed = parse_act_name(self.hook)
        return None if parsed is None else parsed[0]

    @property
    def first_thought(self) -> int:
        """The first step the site exists at: 1 for a thought's input (nothing is fed at BOT), else 0."""
        return 1 if self.hook.endswith("hook_input") else 0

    def at(self, thought: int) -> Site:
        """The same place at another step (``thought.3.hook_hidden`` -> ``thought.5.hook_hidden``)."""
        parsed = parse_thought_hook(self.hook)
        if parsed is not None:
            return Site(thought_hook_name(thought, parsed[1]), head=self.head)
        return Site(self.hook, thought_position(thought), self.head)

    def across_thoughts(self, n_latents: int) -> list[Site]:
        """The same place at every step of a run with ``n_latents`` thoughts."""
        return [self.at(k) for k in range(self.first_thought, n_latents + 1)]

    @property
    def id(self) -> str:
        """A file-name-safe id: ``thought.3.hook_hidden``, ``blocks.1.hook_resid_post@3`` (at thought 3), or
        ``blocks.0.hook_resid_post@eot``."""
        if self.is_thought_hook:
            return self.hook
        thought = self.thought
        return f"{self.hook}@{self.position if thought is None else thought}"

    @classmethod
    def parse(cls, text: str) -> Site:
        """The inverse of :attr:`id` (also accepts ``hook@k`` for a thought hook if they agree)."""
        hook, _, where = text.partition("@")
        parsed = parse_thought_hook(hook)
        if parsed is not None:
            if where and where.isdigit() and int(where) != parsed[0]:
                raise PositionError(f"{text!r}: {hook} belongs to thought {parsed[0]}, not {where}")
            return cls(hook)
        if not where:
            raise PositionError(f"{text!r}: a hook with a position axis needs a thought, e.g. {hook}@3")
        return cls(hook, thought_position(int(where)) if where.isdigit() else where)

    def _key(self) -> tuple:
        thought = self.thought
        return (
            self.hook,
            -1 if thought is None else thought,
            self.position or "",
            -1 if self.head is None else self.head,
        )

    def __lt__(self, other: Site) -> bool:
        return self._key() < other._key()
