"""Chained versus parallel patching of the thoughts: does the loop itself carry a patched value forward?

``chained(L, k)`` writes the clean activation into thought k only and lets the corrupted run's loop compute
thoughts k+1.. from the patched state; ``parallel(L, k)`` writes the clean activation into every thought
k..n at once. :func:`trajectory_rows` compares the two per later thought (cosine to the clean and the
corrupted run) and at the answer.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from codi_lens.core.branching import Branch, run_branches
from codi_lens.core.hooks import Hooks
from codi_lens.core.model import CODIModel
from codi_lens.core.names import act_name
from codi_lens.core.positions import CODIPositions, gather_at
from codi_lens.core.recording import ActivationRecorder
from codi_lens.interventions.positions import replace_at
from codi_lens.metrics import DEFAULT_ANSWER_METRIC, kl_divergence, normalised_recovery
from codi_lens.patching.prepare import batch_readings, metric_value, prepare_pairs
from codi_lens.patching.sweep import skipped_rows
from codi_lens.run.executors import Executor
from codi_lens.run.store import UNIT_COLUMN, ResultStore


def trajectory_rows(
    model: CODIModel,
    pairs: pd.DataFrame,
    layers: Sequence[int],
    *,
    n_latents: int = 6,
    max_new_tokens: int = 256,
    max_rows: int = 256,
    metric: str = DEFAULT_ANSWER_METRIC,
    answer_from: str = "model",
) -> pd.DataFrame:
    """Chained versus parallel patching of ``blocks.L.hook_resid_post`` for one batch of pairs.

    ``chained(L, k)`` writes the clean activation into thought k only and lets the corrupted run's loop
    compute thoughts k+1.. from the patched state; ``parallel(L, k)`` writes the clean activation into
    every thought k..n at once. For each (layer, start thought k, mode) one row per later thought j >= k:
    ``cos_clean`` / ``cos_corrupted`` (cosine of the patched run's layer-L activation at thought j with
    the clean / corrupted run's), ``fed_cos_clean`` / ``fed_cos_corrupted`` (the same for the thought fed
    at j), and the run's final ``recovery``, ``logit_diff`` and ``kl`` at the answer, compared as ``metric``
    says (see :mod:`codi_lens.patching.sweep`).

    Every configuration branches off the corrupted run at its start thought (:mod:`codi_lens.core.branching`):
    one teacher-forced forward per layer gives every configuration's activations and answer logits.
    """
    hooks = [act_name("resid_post", layer) for layer in layers]
    batch, kept, skipped = prepare_pairs(
        model, pairs, hooks, n_latents=n_latents, max_new_tokens=max_new_tokens, metric=metric, answer_from=answer_from
    )
    frames = [skipped_rows(skipped)]
    if batch is None:
        return frames[0]
    corrupted_q = kept["corrupted_question"].tolist()
    corrupted = model.run_latents(corrupted_q, names_filter=hooks, n_latents=n_latents)
    trunk = batch.trunk_of(model, corrupted_q, n_latents)
    reads = batch_readings(batch)
    names = [f"thought:{k}" for k in range(1, n_latents + 1)]
    for layer in layers:
        hook = act_name("resid_post", layer)
        clean_acts = _at(batch.clean_cache[hook], batch.clean_positions, names)  # [batch, n, d]
        corrupted_acts = _at(corrupted.cache[hook], corrupted.positions, names)
        configs = [(start, mode) for start in range(1, n_latents + 1) for mode in ("chained", "parallel")]
        recorders = [ActivationRecorder(model.chunk_scope) for _ in configs]
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
        outputs = run_branches(model, trunk, branches, reads[0].answers, answer_index=reads[0].rows, max_rows=max_rows)
        unrecorded = [Branch(b.hooks[:-1], b.start) for b in branches]
        others = [
            run_branches(model, trunk, unrecorded, r.answers, answer_index=r.rows, max_rows=max_rows) for r in reads[1:]
        ]
        for c, ((start, mode), recorder, output) in enumerate(zip(configs, recorders, outputs)):
            acts = _at(recorder.tensors()[hook], trunk.positions, names)  # thoughts before start are not recorded
            logits = output.logits[:, 0].float()
            ld = metric_value(batch, [output.logits, *(other[c].logits for other in others)]).cpu()
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
                            "logit_diff": ld.numpy(),
                            "metric": batch.metric,
                            "recovery": recovery,
                            "kl": kl,
                            "reason": "",
                        }
                    )
                )
    return pd.concat([f for f in frames if len(f)], ignore_index=True)


def _at(acts: Tensor, positions: CODIPositions, names: list[str]) -> Tensor:
    return gather_at(acts, positions.resolve(names))


def _cos(a: Tensor, b: Tensor) -> np.ndarray:
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1).cpu().numpy()


def chained(model: CODIModel, layer: int, k: int, clean_acts: Float[Tensor, "batch n_latents d_model"]) -> Hooks:
    """Write the clean ``blocks.{layer}.hook_resid_post`` of thought k (``clean_acts[:, k - 1]``, from
    ``[batch, n, d_model]`` clean activations at thoughts 1..n) into thought k only."""
    return _patch_thoughts(model, layer, [k], clean_acts)


def parallel(
    model: CODIModel, layer: int, thoughts: Sequence[int], clean_acts: Float[Tensor, "batch n_latents d_model"]
) -> Hooks:
    """Write the clean ``blocks.{layer}.hook_resid_post`` into every thought of ``thoughts`` at once."""
    return _patch_thoughts(model, layer, list(thoughts), clean_acts)


def _patch_thoughts(model: CODIModel, layer: int, thoughts: list[int], clean_acts: Tensor) -> Hooks:
    values = clean_acts[:, [k - 1 for k in thoughts]]
    return replace_at(model, act_name("resid_post", layer), [f"thought:{k}" for k in thoughts], values)


def clean_thought_activations(
    model: CODIModel, questions: Sequence[str], layer: int, *, n_latents: int = 6
) -> Float[Tensor, "batch n_latents d_model"]:
    """``blocks.{layer}.hook_resid_post`` at thoughts 1..n of a clean run, ``[batch, n, d_model]``."""
    hook = act_name("resid_post", layer)
    run = model.run_latents(list(questions), names_filter=hook, n_latents=n_latents)
    return _at(run.cache[hook], run.positions, [f"thought:{k}" for k in range(1, n_latents + 1)])


def trajectory_sweep(
    model: CODIModel,
    pairs: pd.DataFrame,
    layers: Sequence[int],
    out: str | Path,
    *,
    n_latents: int = 6,
    max_new_tokens: int = 256,
    batch_size: int = 16,
    metric: str = DEFAULT_ANSWER_METRIC,
    answer_from: str = "model",
    settings: dict[str, Any] | None = None,
    overwrite: bool = False,
    progress: bool = True,
    executor: Executor | None = None,
) -> tuple[pd.DataFrame, ResultStore]:
    """:func:`trajectory_rows` on every pair, resumable in ``out`` (``batch_size`` pairs at a time). Returns
    the rows (skipped pairs carry a ``reason``) and the store. ``metric``: how the answers are compared;
    ``answer_from``: whose answer is teacher-forced (see :func:`~codi_lens.patching.prepare.prepare_pairs`)."""
    layers = list(layers)
    bad = [layer for layer in layers if not 0 <= layer < model.cfg.n_layers]
    if bad:
        raise ValueError(f"layer {bad[0]} is outside 0..{model.cfg.n_layers - 1}")
    store = ResultStore(
        out,
        {
            **(settings or {}),
            "pairs": sorted(str(p) for p in pairs["pair_id"]),
            "layers": layers,
            "n_latents": n_latents,
            "max_new_tokens": max_new_tokens,
            "metric": metric,
            "answer_from": answer_from,
        },
        overwrite=overwrite,
    )
    rows = store.run(
        pairs.to_dict("records"),
        lambda batch: trajectory_rows(
            model,
            pd.DataFrame(batch),
            layers,
            n_latents=n_latents,
            max_new_tokens=max_new_tokens,
            metric=metric,
            answer_from=answer_from,
        ),
        unit_id=lambda r: str(r["pair_id"]),
        batch_size=batch_size,
        desc="chained vs parallel",
        progress=progress,
        executor=executor,
        size=lambda _: 2 * len(layers) * n_latents,
        unit="configuration",
        model=model,
    )
    return rows, store
