"""Route patching: by which way does a thought's content reach the answer?

In the latent loop the content of step k (BOT is step 0, thought k is step k) travels on by two routes:

- **recurrence** (R): ``h_k`` goes through the projection head and is fed as thought k + 1's input
  ``z_{k+1}``;
- **attention** (A): every later position reads step k's keys and values from the KV cache, at every layer.

A route patch writes the clean run's contribution of step k (or of a span of steps) into the corrupted run
through one route and pins the other at the corrupted run's values:

- ``recurrence``: the fed ``z_{k+1}`` from the clean run; step k's keys and values stay the corrupted run's.
  Nothing before thought k + 1 changes, so the branch starts there.
- ``attention``: step k's keys and values from the clean run at the chosen layer (or every layer, ``layer =
  -1``; or one key/value head of a layer), its keys and values at every other layer and the fed ``z_{k+1}``
  pinned to the corrupted run's. Pinning matters: a clean key/value at layer L changes step k's own residual
  above L (the position attends to itself), which would otherwise change its higher keys and values and
  ``h_k``, leaking into the other route.
- ``both``: the two together.

The *interaction* ``both - (recurrence + attention)`` (every layer) is what neither route does alone.
Keys are patched before the rotary embedding (``hook_k``, what the KV cache holds), so a clean key written
at the corrupted run's thought k is rotated for the corrupted run's own position: clean and corrupted
questions of different lengths line up by name (``thought:k``). With every layer's keys and values and
``z_{k+1}`` clean, step k is fully the clean run's: ``both`` at every layer equals patching step k's residual
at every layer (tested). A span ``first..last`` patches every step's keys and values in it and the fed input
after its last step; the last thought has no recurrence (``prj(h_n)`` is never fed), so its routes are
``attention`` only.

Metrics are the patching sweep's (:mod:`codi_lens.patching.sweep`): ``logit_diff``, ``recovery``, ``kl`` at
the answer number, teacher-forced on the clean answer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from jaxtyping import Float
from torch import Tensor

from codi_lens.core.branching import Branch, Trunk
from codi_lens.core.hooks import Hooks
from codi_lens.core.model import CODIModel
from codi_lens.core.names import act_name
from codi_lens.core.positions import gather_at
from codi_lens.core.registry import Registry
from codi_lens.core.sites import thought_position
from codi_lens.interventions.positions import replace_at
from codi_lens.interventions.thoughts import replace_thoughts
from codi_lens.metrics import DEFAULT_ANSWER_METRIC, kl_divergence, normalised_recovery
from codi_lens.patching.exact import branch_metric
from codi_lens.patching.prepare import PairBatch, from_other_problems, prepare_pairs
from codi_lens.patching.sweep import DONORS, NO_OTHER_PAIR, skipped_rows, sweep_pairs
from codi_lens.run.executors import Executor
from codi_lens.run.store import UNIT_COLUMN, ResultStore

#: The routes a step's content can be patched through.
ROUTES: Registry[str] = Registry("route")
ROUTES.add("recurrence", "the fed input after the step (z_{k+1} = prj(h_k)) from the clean run")
ROUTES.add("attention", "the step's keys and values from the clean run (at one layer, or every layer)")
ROUTES.add("both", "the recurrence and the attention route together")
#: ``layer`` of an attention route that covers every layer.
EVERY_LAYER = -1


@dataclass(frozen=True, order=True)
class Span:
    """Consecutive steps of the loop, ``first..last`` (0 = BOT, k = thought k)."""

    first: int
    last: int

    def __post_init__(self) -> None:
        if not 0 <= self.first <= self.last:
            raise ValueError(f"a span runs from step first >= 0 to last >= first, got {self.first}..{self.last}")

    @classmethod
    def step(cls, k: int) -> Span:
        return cls(k, k)

    @classmethod
    def parse(cls, text: str) -> Span:
        """``"3"`` (thought 3), ``"0"`` or ``"bot"`` (BOT), ``"1-3"`` (thoughts 1..3)."""
        text = text.strip()
        first, _, last = text.partition("-")
        try:
            a = 0 if first == "bot" else int(first)
            return cls(a, int(last) if last else a)
        except ValueError:
            raise ValueError(f"a span is a step (3, bot) or a range of steps (1-3), not {text!r}") from None

    @property
    def name(self) -> str:
        """``bot``, ``thought:3`` or ``thoughts:1-3``."""
        if self.first == self.last:
            return thought_position(self.first)
        return f"thoughts:{self.first}-{self.last}"

    @property
    def positions(self) -> list[str]:
        """The named positions of its steps."""
        return [thought_position(k) for k in range(self.first, self.last + 1)]


@dataclass(frozen=True)
class RoutePatch:
    """One route patch: a span of steps, a route, and for the attention route the layer (``EVERY_LAYER``: all)
    and optionally one key/value head of it."""

    span: Span
    route: str
    layer: int = EVERY_LAYER
    head: int | None = None

    def __post_init__(self) -> None:
        ROUTES[self.route]
        if self.route == "recurrence" and (self.layer != EVERY_LAYER or self.head is not None):
            raise ValueError("the recurrence route has no layer or head: it patches the fed thought")
        if self.head is not None and self.layer == EVERY_LAYER:
            raise ValueError("a key/value head belongs to one layer: give the layer too")

    def patches_kv(self, layer: int) -> bool:
        """Whether this patch writes clean keys and values at ``layer``."""
        return self.route != "recurrence" and self.layer in (EVERY_LAYER, layer)


def route_patches(
    n_layers: int,
    n_latents: int,
    spans: Sequence[Span] | None = None,
    *,
    by_layer: bool = True,
    n_kv_heads: int | None = None,
) -> list[RoutePatch]:
    """The patches of a route sweep. Default spans: BOT and every thought, one step each. Per span: the
    recurrence (not after the last thought), the attention route at every layer and both; ``by_layer`` adds
    the attention route at each layer alone, ``n_kv_heads`` each key/value head of each layer alone."""
    spans = [Span.step(k) for k in range(n_latents + 1)] if spans is None else list(spans)
    out = []
    for span in spans:
        if span.last > n_latents:
            raise ValueError(f"span {span.name} is outside a run with {n_latents} thoughts")
        fed = span.last < n_latents
        out += [RoutePatch(span, "recurrence")] * fed + [RoutePatch(span, "attention")]
        out += [RoutePatch(span, "both")] * fed
        if by_layer:
            out += [RoutePatch(span, "attention", layer) for layer in range(n_layers)]
        if n_kv_heads:
            out += [RoutePatch(span, "attention", layer, h) for layer in range(n_layers) for h in range(n_kv_heads)]
    return out


def kv_hook_names(n_layers: int) -> list[str]:
    """The key and value hook points of every layer (``blocks.L.attn.hook_k`` / ``hook_v``): what a route sweep
    caches of the clean run."""
    return [act_name(kind, layer) for layer in range(n_layers) for kind in ("k", "v")]


def step_kv(
    batch: PairBatch, trunk: Trunk, span: Span, kind: str, layer: int
) -> tuple[Float[Tensor, "batch n_steps n_kv_heads d_head"], Float[Tensor, "batch n_steps n_kv_heads d_head"]]:
    """The span's keys (``kind="k"``) or values (``"v"``) at ``layer``, before the rotary embedding: the clean
    run's (from the batch's clean cache) and the corrupted run's (from its trunk's KV cache), each at its own
    run's positions."""
    names = span.positions
    clean = gather_at(batch.clean_cache[act_name(kind, layer)], batch.clean_positions.resolve(names))
    cache = trunk.keys if kind == "k" else trunk.values
    corrupted = gather_at(cache[layer], trunk.positions.resolve(names).to(cache[layer].device))
    return clean, corrupted


def route_hooks(model: CODIModel, patch: RoutePatch, batch: PairBatch, trunk: Trunk) -> Hooks:
    """The ``fwd_hooks`` of one route patch on the corrupted run (``trunk``): the span's keys and values pinned
    at every layer (clean where the patch says, else corrupted) unless the route is the recurrence alone, and
    the fed input after the span (clean through the recurrence, else corrupted)."""
    hooks: Hooks = []
    span, n = patch.span, trunk.positions.n_latents
    if patch.route != "recurrence":
        for layer in range(model.cfg.n_layers):
            for kind in ("k", "v"):
                clean, corrupted = step_kv(batch, trunk, span, kind, layer)
                values = corrupted
                if patch.patches_kv(layer):
                    values = clean if patch.head is None else _with_head(corrupted, clean, patch.head)
                hooks += replace_at(model, act_name(kind, layer), span.positions, values)
    if span.last < n:
        source = batch.clean_thoughts if patch.route in ("recurrence", "both") else trunk.thought_inputs
        hooks += replace_thoughts({span.last + 1: source[:, span.last]})
    return hooks


def _with_head(corrupted: Tensor, clean: Tensor, head: int) -> Tensor:
    out = corrupted.clone()
    out[:, :, head] = clean[:, :, head].to(out.device)
    return out


def route_start(patch: RoutePatch) -> int:
    """The first step a route patch changes: the span's first step, or, for the recurrence alone, the thought
    fed after the span."""
    return patch.span.last + 1 if patch.route == "recurrence" else patch.span.first


def route_branches(model: CODIModel, batch: PairBatch, trunk: Trunk, patches: Sequence[RoutePatch]) -> list[Branch]:
    """One branch of the corrupted run per route patch."""
    return [Branch(route_hooks(model, p, batch, trunk), route_start(p)) for p in patches]


def route_rows(
    model: CODIModel,
    pairs: pd.DataFrame,
    patches: Sequence[RoutePatch],
    *,
    n_latents: int = 6,
    max_new_tokens: int = 256,
    max_rows: int = 256,
    donor: str = "clean",
    metric: str = DEFAULT_ANSWER_METRIC,
    answer_from: str = "model",
) -> pd.DataFrame:
    """Every route patch on a batch of pairs: one row per (pair, patch) with ``target`` (the span's name),
    ``thought`` (its last step), ``first_thought``, ``route``, ``layer`` (-1: every layer), ``head`` (NaN: every
    key/value head), ``logit_diff``, ``recovery`` and ``kl``, plus one row per skipped pair with its ``reason``.
    ``donor="other"``: the control, each pair patched from another pair's clean run."""
    DONORS[donor]
    batch, kept, skipped = prepare_pairs(
        model,
        pairs,
        kv_hook_names(model.cfg.n_layers),
        n_latents=n_latents,
        max_new_tokens=max_new_tokens,
        metric=metric,
        answer_from=answer_from,
    )
    if donor == "other" and len(kept) == 1:
        skipped, batch = pd.concat([skipped, kept.assign(reason=NO_OTHER_PAIR)]), None
    frames = [skipped_rows(skipped).assign(donor=donor, metric=metric)]
    if batch is None:
        return frames[0]
    if donor == "other":
        batch = from_other_problems(batch)
    questions = kept["corrupted_question"].tolist()
    trunk = batch.trunk_of(model, questions, n_latents)
    branches = route_branches(model, batch, trunk, patches)
    lds, logits, _ = branch_metric(model, batch, questions, branches, n_latents=n_latents, max_rows=max_rows)
    for patch, ld, patched_logits in zip(patches, lds, logits):
        kl = kl_divergence(batch.clean_logits, patched_logits).cpu().numpy()
        frames.append(_patch_rows(patch, kept, batch, ld, kl, donor))
    return pd.concat([f for f in frames if len(f)], ignore_index=True)


def _patch_rows(
    patch: RoutePatch, kept: pd.DataFrame, batch: PairBatch, ld: Tensor, kl: np.ndarray, donor: str
) -> pd.DataFrame:
    ids = kept["pair_id"].to_numpy()
    return pd.DataFrame(
        {
            UNIT_COLUMN: ids,
            "pair_id": ids,
            "donor": donor,
            "metric": batch.metric,
            "target": patch.span.name,
            "thought": patch.span.last,
            "first_thought": patch.span.first,
            "route": patch.route,
            "layer": patch.layer,
            "head": np.nan if patch.head is None else patch.head,
            "logit_diff": ld.numpy(),
            "ld_clean": batch.ld_clean.numpy(),
            "ld_corrupted": batch.ld_corrupted.numpy(),
            "recovery": normalised_recovery(ld, batch.ld_corrupted, batch.ld_clean),
            "kl": kl,
            "reason": "",
        }
    )


def route_sweep(
    model: CODIModel,
    pairs: pd.DataFrame,
    out: str | Path,
    *,
    patches: Sequence[RoutePatch] | None = None,
    n_latents: int = 6,
    max_new_tokens: int = 256,
    batch_size: int = 16,
    max_rows: int = 256,
    donor: str = "clean",
    metric: str = DEFAULT_ANSWER_METRIC,
    answer_from: str = "model",
    settings: dict[str, Any] | None = None,
    overwrite: bool = False,
    progress: bool = True,
    executor: Executor | None = None,
) -> tuple[pd.DataFrame, ResultStore]:
    """Every route patch (default: :func:`route_patches` of every step, by layer) on every pair, resumable in
    ``out``, ``batch_size`` pairs at a time; see :func:`route_rows`. Returns the rows and the store."""
    if patches is None:
        patches = route_patches(model.cfg.n_layers, n_latents)
    return sweep_pairs(
        model,
        pairs,
        out,
        lambda batch: route_rows(
            model,
            batch,
            patches,
            n_latents=n_latents,
            max_new_tokens=max_new_tokens,
            max_rows=max_rows,
            donor=donor,
            metric=metric,
            answer_from=answer_from,
        ),
        {
            **(settings or {}),
            "patches": [f"{p.span.name}|{p.route}|{p.layer}|{p.head}" for p in patches],
            "n_latents": n_latents,
            "max_new_tokens": max_new_tokens,
            "donor": donor,
            "metric": metric,
            "answer_from": answer_from,
        },
        desc="route patching",
        unit="patch",
        size=len(patches),
        batch_size=batch_size,
        overwrite=overwrite,
        progress=progress,
        executor=executor,
    )


def interactions(rows: pd.DataFrame) -> pd.DataFrame:
    """Per pair and target with all three routes at every layer: ``both - (recurrence + attention)`` in
    ``recovery`` and ``logit_diff`` (each measured from the corrupted run: ``LD_both - LD_R - LD_A + LD_corr``).
    Zero when the routes add; positive when they act together (synergy), negative when either alone does
    what both do (redundancy)."""
    whole = rows[(rows["reason"].fillna("") == "") & (rows["layer"] == EVERY_LAYER) & rows["head"].isna()]
    out = []
    for value in ("recovery", "logit_diff"):
        wide = whole.pivot_table(index=["pair_id", "target", "thought"], columns="route", values=value)
        if not {"recurrence", "attention", "both"} <= set(wide.columns):
            return pd.DataFrame(columns=["pair_id", "target", "thought", "recovery", "logit_diff"])
        offset = 0.0
        if value == "logit_diff":
            corrupted = whole.groupby(["pair_id", "target", "thought"])["ld_corrupted"].first()
            offset = corrupted.reindex(wide.index)
        out.append((wide["both"] - wide["recurrence"] - wide["attention"] + offset).rename(value))
    return pd.concat(out, axis=1).dropna().reset_index()
