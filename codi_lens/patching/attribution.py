"""Attribution patching: every site's linear estimate from one corrupted forward and one backward pass.

``(a_clean - a_corrupted) . dLD/da``, with gradients through the unrolled loop
(:mod:`codi_lens.core.gradients`); :func:`rank_agreement` says how well it ranks sites against exact
patching. ``python -m benchmarks.attribution`` measures both.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import scipy.stats
import torch
from jaxtyping import Float
from torch import Tensor

from codi_lens.core.branching import QUESTION
from codi_lens.core.gradients import LoopGradients, loop_gradients
from codi_lens.core.model import CODIModel
from codi_lens.core.positions import gather_at
from codi_lens.core.sites import Site
from codi_lens.patching.exact import patch_start
from codi_lens.patching.kinds import CHANGED, SPAN_STARTS, span_positions
from codi_lens.patching.prepare import PairBatch, batch_readings, reading_value


def site_attributions(
    model: CODIModel, batch: PairBatch, questions: Sequence[str], sites: Sequence[Site], *, n_latents: int = 6
) -> list[Float[Tensor, " batch"]]:
    """Attribution patching: the linear estimate of each site's change in logit difference,
    ``(a_clean - a_corrupted) . dLD/da`` summed over the site's positions (and, for ``z``, its head), where LD
    is the batch's metric (for ``answer_logprob``, one pass per side of it, the two estimates added).

    One teacher-forced corrupted run with autograd and one backward pass serve every single-position
    site: the gradient flows through the unrolled loop (:mod:`codi_lens.core.gradients`), so a site at
    thought k counts, to first order, what its change does to thoughts k + 1..n. Span sites (every
    thought at once, or BOT and every thought) take one more pass per hook and span, with partial
    derivatives at the span's positions.
    Returns ``[batch]`` per site."""
    reads = batch_readings(batch)
    clean_tok, corrupted_tok = batch.clean_tokens, batch.corrupted_tokens
    trunk = batch.trunk_of(model, questions, n_latents)  # the steps before each pass's start, computed once

    def gradients(hooks: list[str], hold=None, start: int = QUESTION) -> list[LoopGradients]:
        # One pass per reading of the metric (two for answer_logprob): the estimate is linear, so the
        # metric's is the sum of its parts'.
        return [
            loop_gradients(
                model,
                questions,
                reading.answers,
                reading.rows,
                lambda logits, reading=reading: reading_value(
                    reading, logits, clean_tok.to(logits.device), corrupted_tok.to(logits.device)
                ),
                hooks,
                n_latents=n_latents,
                hold=hold,
                start=start,
                trunk=trunk,
            )
            for reading in reads
        ]

    single = [s for s in sites if s.position not in SPAN_STARTS]
    start = min((patch_start(s, n_latents) for s in single), default=QUESTION)  # autograd from the first step asked
    run = gradients(sorted({s.hook for s in single if s.kind != "thought_input"}), start=start)
    # A site replacing a span of steps at once cuts the paths from one step through the next at its hook:
    # its estimate needs partial derivatives there, one more backward pass per such hook and span.
    held = {
        (s.hook, s.position): gradients(
            [s.hook], {s.hook: span_positions(s, n_latents)}, start=patch_start(s, n_latents)
        )
        for s in sites
        if s.position in SPAN_STARTS
    }
    return [
        sum(_site_attribution(site, batch, part) for part in held.get((site.hook, site.position), run))
        for site in sites
    ]


def _site_attribution(site: Site, batch: PairBatch, run: LoopGradients) -> Float[Tensor, " batch"]:
    if site.kind == "thought_input":
        k = site.thought - 1
        delta = batch.clean_thoughts[:, k].to(run.thought_inputs) - run.thought_inputs[:, k]
        return (delta * run.thought_grads[:, k]).flatten(1).sum(1)
    clean, acts, grads = batch.clean_cache[site.hook], run.acts[site.hook], run.grads[site.hook]
    if site.position == CHANGED:
        return torch.stack([_changed_tokens_term(site, batch, run, i) for i in range(len(batch.clean_numbers))])
    names = span_positions(site, run.positions.n_latents)
    where = run.positions.resolve(names)  # [batch, positions]; the values below are [batch, positions, ...]
    delta = gather_at(clean, batch.clean_positions.resolve(names)).to(acts) - gather_at(acts, where)
    grad = gather_at(grads, where)
    if site.head is not None:
        delta, grad = delta[:, :, site.head], grad[:, :, site.head]
    return (delta * grad).flatten(1).sum(1)


def _changed_tokens_term(site: Site, batch: PairBatch, run: LoopGradients, i: int) -> Float[Tensor, ""]:
    """Example ``i``'s estimate at the tokens of the changed number (their count differs between examples)."""
    clean, acts, grads = batch.clean_cache[site.hook], run.acts[site.hook], run.grads[site.hook]
    in_clean, in_run = batch.changed_tokens[i] or ([], [])
    where_clean = torch.tensor(in_clean, dtype=torch.long) + batch.clean_positions.n_pad[i]
    where_run = torch.tensor(in_run, dtype=torch.long) + run.positions.n_pad[i]
    delta, grad = clean[i, where_clean].to(acts) - acts[i, where_run], grads[i, where_run]
    if site.head is not None:
        delta, grad = delta[:, site.head], grad[:, site.head]
    return (delta * grad).sum()


def rank_agreement(exact: pd.DataFrame, estimated: pd.DataFrame, *, k: int = 10, value: str = "recovery") -> dict:
    """How well an estimate (attribution) ranks sites against exact patching.

    Both tables hold rows of the same sites and pairs (``patch_rows`` output); each site's mean
    ``value`` over pairs is compared: Spearman's rho over sites (``scipy.stats.spearmanr``), and the
    share of exact's top ``k`` sites (largest mean) that are also in the estimate's top ``k``
    (``k`` is cut to the number of sites). Returns ``{cells, spearman, k, top_k_overlap}`` (``cells``:
    the sites compared)."""
    keys = ["hook", "head", "position"]

    def per_site(rows: pd.DataFrame) -> pd.Series:
        used = rows[rows["reason"].fillna("") == ""]
        return used.fillna({"head": -1}).groupby(keys)[value].mean()

    a, b = per_site(exact).align(per_site(estimated), join="inner")
    if len(a) < 2:
        raise ValueError("the two tables share fewer than two sites")
    k = min(k, len(a))
    top_a, top_b = set(a.nlargest(k).index), set(b.nlargest(k).index)
    return {
        "cells": len(a),
        "spearman": float(scipy.stats.spearmanr(a.to_numpy(), b.to_numpy()).statistic),
        "k": k,
        "top_k_overlap": len(top_a & top_b) / k,
    }
