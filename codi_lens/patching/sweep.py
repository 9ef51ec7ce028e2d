"""Patching sweeps: every site on every pair, as a table, resumable.

Metrics per (pair, site), at the answer, teacher-forced on the clean run's own answer tokens before the
number (see :mod:`codi_lens.metrics`), as ``metric`` says (``first_difference`` by default; the ``metric``
column names it and ``compared_token`` says which token of the numbers was compared):

- ``logit_diff``: ``LD = logit[clean token] - logit[corrupted token]`` at the compared row of the patched
  run; with ``metric="answer_logprob"``, ``log p(clean number) - log p(corrupted number)`` instead;
- ``recovery``: ``(LD_patched - LD_corrupted) / (LD_clean - LD_corrupted)`` (NaN when the denominator is 0);
- ``kl``: ``KL(clean || patched)`` in nats at the compared row (``answer_logprob``: the number's first token);
- ``answer_class`` (only with ``generate=True``): the patched run's generated answer is the clean
  one, the corrupted one, or other.

A site is measured exactly (:mod:`codi_lens.patching.exact`) or by its attribution estimate
(:mod:`codi_lens.patching.attribution`), patched from the pair's own clean run or, the control, from another
pair's (:data:`DONORS`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from torch import Tensor

from codi_lens.core.branching import BranchOutput
from codi_lens.core.model import CODIModel
from codi_lens.core.registry import Registry
from codi_lens.core.sites import Site
from codi_lens.metrics import DEFAULT_ANSWER_METRIC, classify_answer, kl_divergence, normalised_recovery
from codi_lens.patching.attribution import site_attributions
from codi_lens.patching.exact import patched_metric
from codi_lens.patching.kinds import CHANGED, sweep_sites
from codi_lens.patching.prepare import PairBatch, from_other_problems, prepare_pairs
from codi_lens.run.executors import Executor
from codi_lens.run.store import UNIT_COLUMN, ResultStore

#: How a sweep measures a site.
METHODS: Registry[str] = Registry("patching method")
METHODS.add("exact", "patch the site and run the loop on")
METHODS.add("attribution", "the gradient's linear estimate (one forward and one backward pass for every site)")
#: Whose clean run a patch copies.
DONORS: Registry[str] = Registry("donor")
DONORS.add("clean", "the pair's own clean run")
DONORS.add("other", "the control: another pair's clean run from the same batch")
NO_OTHER_PAIR = "no other usable pair in the batch to take values from"


def patch_rows(
    model: CODIModel,
    pairs: pd.DataFrame,
    sites: Sequence[Site],
    *,
    n_latents: int = 6,
    max_new_tokens: int = 256,
    generate: bool = False,
    max_rows: int = 256,
    method: str = "exact",
    donor: str = "clean",
    metric: str = DEFAULT_ANSWER_METRIC,
    answer_from: str = "model",
) -> pd.DataFrame:
    """Every site on a batch of pairs: one row per (pair, site), plus one row per skipped pair with its
    ``reason`` (and NaN metrics), so a resumed run knows it was seen.

    ``metric``: how the two answers are compared (:data:`~codi_lens.metrics.ANSWER_METRICS`); ``answer_from``:
    the clean run's own answer (``"model"``) or the gold one (``"gold"``, for random weights; see
    :func:`~codi_lens.patching.prepare.prepare_pairs`).

    ``donor="other"`` is the control: each pair is patched with another pair's clean run
    (:func:`~codi_lens.patching.prepare.from_other_problems`); a batch left with one usable pair skips it
    (``reason`` says so).

    ``method="exact"``: the clean and the corrupted runs are computed once and sites branch off the
    corrupted one (see :func:`~codi_lens.patching.exact.run_patches`); with ``generate=True`` each branch
    also generates its answer, in the same forwards. ``method="attribution"``: every site's logit difference
    is the linear estimate of :func:`~codi_lens.patching.attribution.site_attributions` (``kl`` is NaN: it has
    no linear estimate); the ``method`` column says which."""
    _check_sweep(sites, method, donor, generate)
    hooks = sorted({s.hook for s in sites if s.kind != "thought_input"})
    batch, kept, skipped = prepare_pairs(
        model, pairs, hooks, n_latents=n_latents, max_new_tokens=max_new_tokens, metric=metric, answer_from=answer_from
    )
    if donor == "other" and len(kept) == 1:
        skipped = pd.concat([skipped, kept.assign(reason=NO_OTHER_PAIR)])
        batch = None
    frames = [skipped_rows(skipped).assign(donor=donor, metric=metric)]
    if batch is None:
        return frames[0]
    if donor == "other":
        batch = from_other_problems(batch)
    questions = kept["corrupted_question"].tolist()
    if method == "exact":
        lds, logits, outputs = patched_metric(
            model,
            batch,
            questions,
            sites,
            n_latents=n_latents,
            max_rows=max_rows,
            max_new_tokens=max_new_tokens if generate else 0,
        )
        kls = [kl_divergence(batch.clean_logits, x).cpu().numpy() for x in logits]
    else:
        outputs = [None] * len(sites)
        estimates = site_attributions(model, batch, questions, sites, n_latents=n_latents)
        lds = [batch.ld_corrupted + estimate.detach().cpu().double() for estimate in estimates]
        kls = [np.full(len(kept), np.nan)] * len(sites)
    for site, output, ld, kl in zip(sites, outputs, lds, kls):
        frames.append(_site_rows(model, site, kept, batch, ld, kl, output, method=method, donor=donor))
    return pd.concat([f for f in frames if len(f)], ignore_index=True)


def _check_sweep(sites: Sequence[Site], method: str, donor: str, generate: bool) -> None:
    METHODS[method]
    DONORS[donor]
    if generate and method == "attribution":
        raise ValueError("attribution patching estimates metrics; it cannot generate answers (generate=False)")
    if donor == "other" and any(s.position == CHANGED for s in sites):
        raise ValueError("'changed' sites have no counterpart in another problem's question; leave them out")


def _site_rows(
    model: CODIModel,
    site: Site,
    kept: pd.DataFrame,
    batch: PairBatch,
    ld_all: Tensor,
    kl: np.ndarray,
    output: BranchOutput | None,
    *,
    method: str,
    donor: str,
) -> pd.DataFrame:
    """The rows of one site: one per pair it applies to (a ``changed`` site: pairs whose changed number
    tokenizes alike in both questions)."""
    rows = list(range(len(kept)))
    if site.position == CHANGED:
        rows = [i for i in rows if batch.changed_tokens[i] is not None]
    ld, ld_clean, ld_corrupted = ld_all[rows], batch.ld_clean[rows], batch.ld_corrupted[rows]
    frame = pd.DataFrame(
        {
            UNIT_COLUMN: kept["pair_id"].iloc[rows].to_numpy(),
            "pair_id": kept["pair_id"].iloc[rows].to_numpy(),
            "n_steps": kept["n_steps"].iloc[rows].to_numpy() if "n_steps" in kept else np.nan,
            "method": method,
            "donor": donor,
            "metric": batch.metric,
            "compared_token": np.asarray(batch.compared_token)[rows],
            "kind": site.kind,
            "hook": site.hook,
            "layer": np.nan if site.layer is None else site.layer,
            "head": np.nan if site.head is None else site.head,
            "position": site.position,
            "thought": np.nan if site.thought is None else site.thought,
            "logit_diff": ld.cpu().numpy(),
            "ld_clean": ld_clean.cpu().numpy(),
            "ld_corrupted": ld_corrupted.cpu().numpy(),
            "recovery": normalised_recovery(ld, ld_corrupted, ld_clean),
            "kl": kl[rows],
            "reason": "",
        }
    )
    if output is not None and output.answer_tokens is not None:
        _, predictions = model.decode_answers([output.answer_tokens[i] for i in rows])
        frame["prediction"] = [np.nan if p is None else p for p in predictions]
        frame["answer_class"] = [
            classify_answer(p, kept["clean_answer"].iloc[i], kept["corrupted_answer"].iloc[i])
            for p, i in zip(predictions, rows)
        ]
    return frame


def patch_sweep(
    model: CODIModel,
    pairs: pd.DataFrame,
    out: str | Path,
    *,
    sites: Sequence[Site] | None = None,
    n_latents: int = 6,
    max_new_tokens: int = 256,
    generate: bool = False,
    batch_size: int = 16,
    max_rows: int = 256,
    method: str = "exact",
    donor: str = "clean",
    metric: str = DEFAULT_ANSWER_METRIC,
    answer_from: str = "model",
    settings: dict[str, Any] | None = None,
    overwrite: bool = False,
    progress: bool = True,
    executor: Executor | None = None,
) -> tuple[pd.DataFrame, ResultStore]:
    """Patch every site (default: ``resid_post`` of every layer at every default position, plus the
    layer-only sites) on every pair, resumable in ``out``: ``batch_size`` pairs at a time, sites
    batched into forwards of at most ``max_rows`` rows (sites x pairs). Returns the rows (skipped pairs
    carry a ``reason``) and the store. ``method``: ``"exact"`` (patch every site) or ``"attribution"``
    (one forward and one backward pass per batch give every site's linear estimate; see
    :mod:`codi_lens.patching.attribution`). ``donor="other"``: the control, each pair
    patched from another pair's clean run (see :func:`patch_rows`).
    ``executor``: where batches run (default here; :class:`~codi_lens.run.executors.RayExecutor`: Ray tasks).
    """
    if sites is None:
        sites = sweep_sites(model.cfg.n_layers, n_latents, layer_only=True)
    return sweep_pairs(
        model,
        pairs,
        out,
        lambda batch: patch_rows(
            model,
            batch,
            sites,
            n_latents=n_latents,
            max_new_tokens=max_new_tokens,
            generate=generate,
            max_rows=max_rows,
            method=method,
            donor=donor,
            metric=metric,
            answer_from=answer_from,
        ),
        {
            **(settings or {}),
            "cells": [f"{s.hook}|{s.head}|{s.position}" for s in sites],
            "n_latents": n_latents,
            "max_new_tokens": max_new_tokens,
            "generate": generate,
            "method": method,
            "donor": donor,
            "metric": metric,
            "answer_from": answer_from,
        },
        desc="patching",
        unit="cell",
        size=len(sites),
        batch_size=batch_size,
        overwrite=overwrite,
        progress=progress,
        executor=executor,
    )


def sweep_pairs(
    model: CODIModel,
    pairs: pd.DataFrame,
    out: str | Path,
    rows_of: Callable[[pd.DataFrame], pd.DataFrame],
    settings: dict[str, Any],
    *,
    desc: str,
    unit: str,
    size: int = 1,
    batch_size: int = 16,
    overwrite: bool = False,
    progress: bool = True,
    executor: Executor | None = None,
) -> tuple[pd.DataFrame, ResultStore]:
    """Any per-pair measurement over every pair, resumable in ``out``: ``rows_of(batch of pairs)`` gives a batch's
    rows (with ``unit_id`` = pair id), ``batch_size`` pairs at a time; ``settings`` (with the checkpoint's hash and
    the pair ids added) must match to resume; progress counts ``size`` ``unit``s per pair. Returns the rows and the
    store."""
    store = ResultStore(
        out,
        {
            **settings,
            "checkpoint_sha256": model.checkpoint_sha256,
            "pairs": sorted(str(p) for p in pairs["pair_id"]),
        },
        overwrite=overwrite,
    )
    rows = store.run(
        pairs.to_dict("records"),
        lambda records: rows_of(pd.DataFrame(records)),
        unit_id=lambda r: str(r["pair_id"]),
        batch_size=batch_size,
        desc=desc,
        progress=progress,
        executor=executor,
        size=lambda _: size,
        unit=unit,
        model=model,
    )
    return rows, store


def skipped_rows(skipped: pd.DataFrame) -> pd.DataFrame:
    """One row per skipped pair with its reason (so a resumed run knows it was seen)."""
    return pd.DataFrame({UNIT_COLUMN: skipped["pair_id"], "pair_id": skipped["pair_id"], "reason": skipped["reason"]})
