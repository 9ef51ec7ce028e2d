"""Direct logit attribution at the answer number: which parts of the model write the clean-minus-corrupted
logit difference, and from which positions of the loop the heads bring it.

At the compared answer row (the row predicting the number's compared token, teacher-forced on the clean
answer; see :mod:`codi_lens.patching.prepare`) the final residual stream is a sum of parts: the embedding of the
token fed there (``embed``: ``blocks.0.hook_resid_pre``, which for GPT-2 also holds the position embedding), and
every layer's attention and MLP outputs. With the final norm's scale *frozen* at its value in the run (the
norm is then linear in its input: ``x / scale * w``, with the mean removed first for LayerNorm), the logit
difference ``logit[clean token] - logit[corrupted token]`` is the sum of each part's projection on the
direction ``e = w * (W_U[:, clean] - W_U[:, corrupted]) / scale`` (centred for LayerNorm) plus the bias terms
(the final LayerNorm's ``b`` and the unembedding's ``b_U``, named ``ln_final.b`` and ``unembed.b``).

A layer's attention output is ``sum_h z_h W_O[h] + b_O``: each head's term is ``z_h W_O[h] . e``, and since
``z_h = sum_s pattern[h, s] v_h[s]`` at the answer row, each head's term splits over the source positions it
reads: ``pattern[h, s] (v_h[s] W_O[h] . e)``. Sources are named: ``question`` (the question's tokens other than
the changed number's), ``changed`` (the changed number's tokens, when the pair knows them), ``bot``,
``thought:k``, ``eot`` and ``answer`` (the answer tokens fed before the row). For grouped-query attention
(LLaMA), query head h reads key/value head ``h // (n_heads / n_kv_heads)``.

Every identity is exact in real arithmetic and holds to float32 rounding in the tables (tested): the rows of
``level == "layer"`` sum to ``total``; a layer's head rows sum to its ``attn`` row less its ``bias`` column;
a head's source rows sum to the head row; ``total`` is the run's logit difference at the row.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from codi_lens.core.model import CODIModel
from codi_lens.core.names import act_name
from codi_lens.core.recording import ActivationRecorder
from codi_lens.metrics import DEFAULT_ANSWER_METRIC
from codi_lens.patching import PairBatch, batch_readings, prepare_pairs
from codi_lens.patching.sweep import skipped_rows, sweep_pairs
from codi_lens.run.executors import Executor
from codi_lens.run.store import UNIT_COLUMN, ResultStore

#: The runs a pair's logit difference is decomposed in.
RUNS = ("clean", "corrupted")
#: Metrics that are a logit difference at one row (``answer_logprob`` sums log-probabilities over tokens).
LOGIT_DIFFERENCE_METRICS = ("first_token", "first_difference")


def recorded_names(n_layers: int) -> list[str]:
    """What a decomposition reads at the answer row: the embedding, every layer's attention and MLP outputs and
    each head's ``z``, the last residual and the final norm's scale (patterns and values are read too, see
    :func:`record_answer_run`)."""
    names = [act_name("resid_pre", 0), act_name("resid_post", n_layers - 1), "ln_final.hook_scale"]
    for layer in range(n_layers):
        names += [act_name(kind, layer) for kind in ("attn_out", "mlp_out", "z")]
    return names


class AnswerRowRecorder:
    """Records, from the teacher-forced answer chunk only, each hook's activation at one row per example
    (``rows[i]``, an index into the chunk): attention patterns are kept as ``[batch, head, key_pos]``, the
    others as ``[batch, ...]``. The whole-sequence recorder would hold every query row of every pattern."""

    def __init__(self, model: CODIModel, rows: Int[Tensor, " batch"]):
        self.scope, self.rows, self.recorded = model.chunk_scope, rows, {}

    def __call__(self, acts: Tensor, hook) -> None:
        context = self.scope.current
        if context.start != context.positions.eot:  # only the teacher-forced chunk, which starts at EOT
            return
        index = torch.arange(acts.shape[0], device=acts.device)
        rows = self.rows.to(acts.device)
        pattern = hook.name.endswith("hook_pattern")  # [batch, head, query, key]; the others [batch, pos, ...]
        self.recorded[hook.name] = (acts[index, :, rows] if pattern else acts[index, rows]).detach()


def record_answer_run(
    model: CODIModel, questions: Sequence[str], answers: Sequence[Sequence[int]], rows: Sequence[int], n_latents: int
) -> tuple[dict[str, Tensor], dict[str, Tensor], Any]:
    """Teacher-force ``answers`` after the questions' loop and record what :func:`decompose` reads: at the answer
    rows (``rows[i]``, row j predicting answer token j), every hook of :func:`recorded_names` and each layer's
    pattern; over the whole sequence, each layer's values (the sources the heads read). Returns the two
    recordings and the run's position map."""
    n_layers = model.cfg.n_layers
    at_row = AnswerRowRecorder(model, torch.tensor(list(rows)))
    whole = ActivationRecorder(model.chunk_scope)
    names = recorded_names(n_layers)
    hooks = [(name, at_row) for name in names] + [(act_name("pattern", layer), at_row) for layer in range(n_layers)]
    hooks += [(act_name("v", layer), whole) for layer in range(n_layers)]
    with torch.no_grad():
        scores = model.score_answers(list(questions), list(answers), n_latents=n_latents, fwd_hooks=hooks)
    return at_row.recorded, whole.tensors(), scores.positions


def logit_direction(
    model: CODIModel, clean_tokens: Int[Tensor, " batch"], corrupted_tokens: Int[Tensor, " batch"], scale: Tensor
) -> Float[Tensor, "batch d_model"]:
    """``e``: the direction in the final residual stream whose dot product with a part is that part's share of
    the logit difference, with the final norm's ``scale`` (``[batch]``) frozen (see the module docstring)."""
    w_u = model.W_U.detach().float()
    direction = w_u[:, clean_tokens].T - w_u[:, corrupted_tokens].T  # [batch, d_model]
    weight = getattr(model.ln_final, "w", None)
    if weight is not None:
        direction = direction * weight.detach().float()
    if model.cfg.normalization_type in ("LN", "LNPre"):  # LayerNorm removes the mean first: centre e instead
        direction = direction - direction.mean(-1, keepdim=True)
    return direction / scale.float()[:, None]


def bias_terms(
    model: CODIModel, clean_tokens: Int[Tensor, " batch"], corrupted_tokens: Int[Tensor, " batch"]
) -> dict[str, Float[Tensor, " batch"]]:
    """The logit difference's parts that do not depend on the input: the final LayerNorm's bias (``ln_final.b``)
    and the unembedding's (``unembed.b``); a model without one has no such term."""
    terms = {}
    w_u = model.W_U.detach().float()
    bias = getattr(model.ln_final, "b", None)
    if bias is not None:
        terms["ln_final.b"] = (w_u[:, clean_tokens].T - w_u[:, corrupted_tokens].T) @ bias.detach().float()
    b_u = getattr(model, "b_U", None)
    if b_u is not None:
        terms["unembed.b"] = (b_u[clean_tokens] - b_u[corrupted_tokens]).detach().float()
    return terms


def source_labels(positions, row_position: Sequence[int], changed: Sequence[Sequence[int] | None]) -> list[list[str]]:
    """Per example, the name of every key position ``0 .. row_position[i]`` (``padding`` before the question)."""
    out = []
    for i, last in enumerate(row_position):
        labels = ["padding"] * positions.n_pad[i] + ["question"] * (positions.bot - positions.n_pad[i])
        for j in changed[i] or ():
            labels[positions.n_pad[i] + j] = "changed"
        labels += ["bot"] + [f"thought:{k}" for k in range(1, positions.n_latents + 1)] + ["eot"]
        labels += ["answer"] * (last + 1 - len(labels))
        out.append(labels[: last + 1])
    return out


def decompose(
    model: CODIModel,
    at_row: dict[str, Tensor],
    values: dict[str, Tensor],
    direction: Float[Tensor, "batch d_model"],
    labels: list[list[str]],
) -> list[list[dict[str, Any]]]:
    """Per example, the rows of the decomposition (without the bias terms): the embedding, each layer's
    attention (with its ``b_O`` share in ``bias``) and MLP, each head, and each head's sources."""
    cfg = model.cfg
    group = cfg.n_heads // (cfg.n_key_value_heads or cfg.n_heads)
    batch = direction.shape[0]
    rows: list[list[dict[str, Any]]] = [[] for _ in range(batch)]
    coded = []  # per example: the distinct source names in order, and each key position's index among them
    for names in labels:
        distinct = list(dict.fromkeys(names))
        coded.append((distinct, torch.tensor([distinct.index(n) for n in names])))

    def add(part: Float[Tensor, " batch"], **fields) -> None:
        for i, value in enumerate(part.tolist()):
            rows[i].append({**fields, "contribution": value})

    add((at_row[act_name("resid_pre", 0)].float() * direction).sum(-1), component="embed", level="layer")
    for layer in range(cfg.n_layers):
        attn = model.blocks[layer].attn
        w_o = attn.W_O.detach().float()  # [head, d_head, d_model]
        on_e = torch.einsum("hdm,bm->bhd", w_o, direction)  # each head's output map read along e
        bias = attn.b_O.detach().float() @ direction.T  # [batch]
        attn_part = (at_row[act_name("attn_out", layer)].float() * direction).sum(-1)
        for i, (value, b) in enumerate(zip(attn_part.tolist(), bias.tolist())):
            rows[i].append({"component": f"blocks.{layer}.attn", "level": "layer", "contribution": value, "bias": b})
        add(
            (at_row[act_name("mlp_out", layer)].float() * direction).sum(-1),
            component=f"blocks.{layer}.mlp",
            level="layer",
        )
        heads = torch.einsum("bhd,bhd->bh", at_row[act_name("z", layer)].float(), on_e)
        pattern = at_row[act_name("pattern", layer)].float()  # [batch, head, key]
        v = values[act_name("v", layer)].float()  # [batch, pos, kv_head, d_head]
        v = v.repeat_interleave(group, dim=2)[:, : pattern.shape[-1]]  # query head h reads kv head h // group
        per_source = pattern * torch.einsum("bshd,bhd->bhs", v, on_e)  # [batch, head, key]
        for i, (names, codes) in enumerate(coded):
            by_source = torch.zeros(cfg.n_heads, len(names)).index_add_(1, codes, per_source[i, :, : len(codes)])
            for h in range(cfg.n_heads):
                component = f"blocks.{layer}.attn.head.{h}"
                rows[i].append({"component": component, "level": "head", "head": h, "contribution": float(heads[i, h])})
                rows[i] += [
                    {"component": component, "level": "source", "head": h, "source": name, "contribution": value}
                    for name, value in zip(names, by_source[h].tolist())
                    if name != "padding"
                ]
    return rows


def attribution_rows(
    model: CODIModel,
    pairs: pd.DataFrame,
    *,
    n_latents: int = 6,
    max_new_tokens: int = 256,
    metric: str = DEFAULT_ANSWER_METRIC,
    answer_from: str = "model",
    runs: Sequence[str] = RUNS,
) -> pd.DataFrame:
    """Direct logit attribution of a batch of pairs, in each of ``runs`` (the clean and the corrupted question,
    both teacher-forced on the clean answer): one row per (pair, run, part) with ``component`` (``embed``,
    ``blocks.L.attn``, ``blocks.L.mlp``, ``blocks.L.attn.head.H``, ``ln_final.b``, ``unembed.b``), ``level``
    (``layer``, ``head``, ``source``), ``layer``, ``head``, ``source``, ``contribution``, ``bias`` (an attention
    row's ``b_O`` share) and ``total`` (the run's logit difference at the row, the final norm's scale frozen),
    plus one row per skipped pair with its ``reason``."""
    if metric not in LOGIT_DIFFERENCE_METRICS:
        raise ValueError(
            f"direct logit attribution decomposes a logit difference at one row: metric must be one of "
            f"{LOGIT_DIFFERENCE_METRICS}, not {metric!r}"
        )
    batch, kept, skipped = prepare_pairs(
        model, pairs, [], n_latents=n_latents, max_new_tokens=max_new_tokens, metric=metric, answer_from=answer_from
    )
    frames = [skipped_rows(skipped)]
    if batch is None:
        return frames[0]
    for run in runs:
        frames.append(_run_rows(model, batch, kept, run, n_latents))
    return pd.concat([f for f in frames if len(f)], ignore_index=True)


def _run_rows(model: CODIModel, batch: PairBatch, kept: pd.DataFrame, run: str, n_latents: int) -> pd.DataFrame:
    reading = batch_readings(batch)[0]
    questions = kept[f"{run}_question"].tolist()
    at_row, values, positions = record_answer_run(model, questions, reading.answers, reading.rows, n_latents)
    scale = at_row["ln_final.hook_scale"].reshape(len(questions))
    direction = logit_direction(model, batch.clean_tokens, batch.corrupted_tokens, scale)
    row_position = [positions.eot + r for r in reading.rows]
    changed = [None if c is None else c[0 if run == "clean" else 1] for c in batch.changed_tokens]
    parts = decompose(model, at_row, values, direction, source_labels(positions, row_position, changed))
    biases = bias_terms(model, batch.clean_tokens, batch.corrupted_tokens)
    final = (at_row[act_name("resid_post", model.cfg.n_layers - 1)].float() * direction).sum(-1)
    total = final + sum(biases.values(), torch.zeros_like(final))
    frames = []
    for i, pair_id in enumerate(kept["pair_id"]):
        extra = [{"component": name, "level": "layer", "contribution": float(term[i])} for name, term in biases.items()]
        frame = pd.DataFrame(parts[i] + extra)
        frames.append(frame.assign(**{UNIT_COLUMN: pair_id, "pair_id": pair_id, "run": run, "total": float(total[i])}))
    out = pd.concat(frames, ignore_index=True)
    out["layer"] = out["component"].str.extract(r"^blocks\.(\d+)\.")[0].astype(float)
    for column in ("head", "bias"):
        out[column] = out.get(column, np.nan)
    out["source"] = out["source"].fillna("") if "source" in out else ""
    out["metric"], out["reason"] = batch.metric, ""
    return out


def attribution_sweep(
    model: CODIModel,
    pairs: pd.DataFrame,
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
    """:func:`attribution_rows` of every pair, resumable in ``out``, ``batch_size`` pairs at a time."""
    return sweep_pairs(
        model,
        pairs,
        out,
        lambda batch: attribution_rows(
            model, batch, n_latents=n_latents, max_new_tokens=max_new_tokens, metric=metric, answer_from=answer_from
        ),
        {
            **(settings or {}),
            "n_latents": n_latents,
            "max_new_tokens": max_new_tokens,
            "metric": metric,
            "answer_from": answer_from,
        },
        desc="logit attribution",
        unit="pair",
        batch_size=batch_size,
        overwrite=overwrite,
        progress=progress,
        executor=executor,
    )
