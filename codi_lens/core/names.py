"""Hook names: every name of a hook point that codi_lens builds comes from a function here.

Standard TransformerLens activations are named by :func:`act_name` (TransformerLens' own
``get_act_name``: ``act_name("resid_post", 3) == "blocks.3.hook_resid_post"``,
``act_name("z", 0) == "blocks.0.attn.hook_z"``). The latent loop adds one set of hook points per step,
named like TransformerLens' (``thought.{k}.hook_*``, :func:`thought_hook_name`):

- ``thought.{k}.hook_input``       (k = 1..n) the embedding fed at thought k        ``[batch, d_model]``
- ``thought.{k}.hook_hidden``      (k = 0..n) ``h_k``, what the projection consumes ``[batch, d_model]``
- ``thought.{k}.hook_projection``  (k = 0..n) ``prj(h_k)``                          ``[batch, d_model]``

``thought.{k}.hook_input`` receives ``thought.{k-1}.hook_projection`` unless a hook changes it. A loop with
the Jacobi schedule (PCCoT) computes every thought once per sweep ``s = 0..S`` and adds, for ``k = 1..n``,
``thought.{k}.sweep.{s}.hook_input`` / ``hook_hidden`` / ``hook_projection`` (:func:`sweep_hook_name`);
there ``thought.{k}.hook_*`` fire at the last sweep, the one the answer reads, after its sweep hooks. The
projection head itself has hook points ``prj.hook_in``, ``prj.hook_mid`` (after GELU) and ``prj.hook_out``,
which fire at every step. An SAE attached at a hook adds ``<hook>.hook_sae_*`` points (:func:`sae_hook_name`).

Activations listed in ``FULL_SPAN_HOOKS`` (rotated keys) cover every cached position at each chunk of a
run, not only the chunk's own (see :mod:`codi_lens.core.positions`).
"""

from __future__ import annotations

import re
from typing import Literal

from transformer_lens.utilities import get_act_name

ThoughtHookKind = Literal["input", "hidden", "projection"]
THOUGHT_HOOK_KINDS: tuple[ThoughtHookKind, ...] = ("input", "hidden", "projection")
_THOUGHT_HOOK = re.compile(r"^thought\.(\d+)\.hook_(input|hidden|projection)$")
_SWEEP_HOOK = re.compile(r"^thought\.(\d+)\.sweep\.(\d+)\.hook_(input|hidden|projection)$")
_BLOCK_HOOK = re.compile(r"^blocks\.(\d+)\.(?:attn\.)?hook_([a-z_]+)$")

#: Activations whose position axis spans every cached position ``0..last`` at each chunk (rotary keys
#: are re-rotated over the whole cache), rather than only the chunk's new positions.
FULL_SPAN_HOOKS = ("attn.hook_rot_k",)


def act_name(kind: str, layer: int | None = None) -> str:
    """A TransformerLens activation name: ``act_name("resid_post", 3) -> "blocks.3.hook_resid_post"``,
    ``act_name("pattern", 1) -> "blocks.1.attn.hook_pattern"``, ``act_name("embed") -> "hook_embed"``."""
    return get_act_name(kind, layer)


def parse_act_name(name: str) -> tuple[int, str] | None:
    """``(layer, kind)`` of a per-block activation name (``blocks.3.attn.hook_z`` -> ``(3, "z")``); None else."""
    match = _BLOCK_HOOK.match(name)
    return None if match is None else (int(match.group(1)), match.group(2))


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


def sweep_hook_name(k: int, sweep: int, kind: ThoughtHookKind = "hidden") -> str:
    """Name of the hook point of thought ``k`` (``k >= 1``) at sweep ``sweep`` of a Jacobi loop, e.g.
    ``thought.3.sweep.2.hook_hidden``."""
    if kind not in THOUGHT_HOOK_KINDS:
        raise ValueError(f"kind must be one of {THOUGHT_HOOK_KINDS}, got {kind!r}")
    if k < 1 or sweep < 0:
        raise ValueError(f"no sweep hook at thought {k}, sweep {sweep}: thoughts are k >= 1, sweeps s >= 0")
    return f"thought.{k}.sweep.{sweep}.hook_{kind}"


def parse_sweep_hook(name: str) -> tuple[int, int, ThoughtHookKind] | None:
    """``(k, sweep, kind)`` of a sweep hook name such as ``thought.3.sweep.2.hook_input``; None for other names."""
    match = _SWEEP_HOOK.match(name)
    if match is None:
        return None
    return int(match.group(1)), int(match.group(2)), match.group(3)  # type: ignore[return-value]


def sae_hook_name(hook: str, point: str = "acts_post") -> str:
    """A hook point of the SAE attached at ``hook``: ``sae_hook_name("thought.3.hook_hidden")`` is
    ``thought.3.hook_hidden.hook_sae_acts_post`` (SAELens' names: acts_pre, acts_post, recons, error, output)."""
    return f"{hook}.hook_sae_{point}"


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
