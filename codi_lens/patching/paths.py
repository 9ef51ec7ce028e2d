"""Path patching inside the latent loop: the effect of one component on the answer through chosen receivers only.

A *sender* is a component's output at named positions of the run: ``hook_embed`` (the input at a position: a
token's embedding, or the thought fed there), one head's ``hook_z``, or a layer's ``hook_mlp_out``. A
*receiver* is where the sender's effect is let through: the answer itself (``ANSWER``: the logits at the compared
row), a later component (a head's ``hook_z`` or an MLP's ``hook_mlp_out`` at a position), a residual stream
(``hook_resid_*`` at a position), or a thought's fed input (``thought.k.hook_input``: the recurrence).

Two runs of the corrupted questions, teacher-forced on the clean answer (Goldowsky-Dill et al. 2023, Wang et al.
2022, carried into the loop):

1. *Sender run*: the sender is written with the clean run's value; every other path is frozen at the corrupted
   run: every head's ``z`` and every MLP's output at every position (so no component reacts), and every fed
   thought (so the recurrence carries nothing) -- except the receivers, which are computed. The receivers'
   values are recorded. With ``ANSWER`` as the receiver, this run's logits are the result: the sender's
   direct path to the answer, the final norm recomputed.
2. *Receiver run*: the receivers' recorded values are written into an ordinary corrupted run, whose loop then
   goes on freely; the metric is read at the answer.

With no sender, both runs are the corrupted run; with every component at every position as sender and the
answer as receiver, the sender run is the clean run (tested). Positions are matched by name; freezing matches
the corrupted run position by position, so it needs the run's own layout (it is always the corrupted questions
with the clean answer).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path as FilePath
from typing import Any

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from codi_lens.core.hooks import Hooks
from codi_lens.core.model import CODIModel
from codi_lens.core.names import act_name, parse_thought_hook, thought_hook_name
from codi_lens.core.positions import CODIPositions, gather_at
from codi_lens.core.recording import ActivationRecorder
from codi_lens.core.registry import Registry
from codi_lens.core.sites import Site
from codi_lens.metrics import DEFAULT_ANSWER_METRIC, normalised_recovery
from codi_lens.patching.prepare import PairBatch, batch_readings, metric_value, prepare_pairs
from codi_lens.patching.sweep import skipped_rows, sweep_pairs
from codi_lens.run.executors import Executor
from codi_lens.run.store import UNIT_COLUMN, ResultStore

#: The receiver that is the answer itself: the sender's effect read at the compared row's logits.
ANSWER = "answer"
#: The position of the compared answer row (the row whose logits the metric reads; ``eot`` or ``answer:j``,
#: per pair): senders and receivers may name it.
ANSWER_ROW = "answer_row"
#: Component kinds a sender can be.
SENDER_KINDS = ("embed", "z", "mlp_out")


@dataclass(frozen=True)
class PathRun:
    """One side's recorded run: its questions, every component's output over the whole sequence, the fed thoughts,
    and the position map (the questions teacher-forced on the batch's clean answer)."""

    questions: tuple[str, ...]
    answer_rows: tuple[int, ...]
    outputs: dict[str, Float[Tensor, "batch pos *rest"]]
    thoughts: Float[Tensor, "batch n_latents d_model"]
    positions: CODIPositions


def component_names(n_layers: int) -> list[str]:
    """Every component whose output is frozen or sent: the input embedding, each layer's heads (``z``) and MLP."""
    return ["hook_embed"] + [act_name(kind, layer) for layer in range(n_layers) for kind in ("z", "mlp_out")]


def record_run(
    model: CODIModel,
    questions: Sequence[str],
    answers: Sequence[Sequence[int]],
    answer_rows: Sequence[int],
    n_latents: int,
) -> PathRun:
    """Run ``questions`` teacher-forced on ``answers`` and record every component (:func:`component_names`);
    ``answer_rows``: per example, the answer row the metric reads (:data:`ANSWER_ROW`)."""
    recorder = ActivationRecorder(model.chunk_scope)
    names = component_names(model.cfg.n_layers)
    with torch.no_grad():
        scores = model.score_answers(
            list(questions), list(answers), n_latents=n_latents, fwd_hooks=[(n, recorder) for n in names]
        )
    outputs = recorder.tensors()
    thoughts = outputs["hook_embed"][:, scores.positions.thoughts]  # the fed thoughts, as the embedding saw them
    return PathRun(tuple(questions), tuple(answer_rows), outputs, thoughts, scores.positions)


def resolve(run: PathRun, position: str | int) -> Int[Tensor, " batch"]:
    """Each example's absolute position of a named position in ``run`` (:data:`ANSWER_ROW` included)."""
    if position == ANSWER_ROW:
        return torch.tensor([run.positions.eot + r for r in run.answer_rows])
    return run.positions.resolve([position])[:, 0]


def check_sender(site: Site) -> None:
    """Refuse a sender that is not a component's output at a position (``hook_embed``, one head's ``hook_z``,
    ``hook_mlp_out``)."""
    kind = "embed" if site.hook == "hook_embed" else site.kind
    if kind not in SENDER_KINDS or (kind == "embed" and site.head is not None):
        raise ValueError(f"a sender is hook_embed, one head's hook_z or hook_mlp_out at a position, not {site.hook}")
    if kind == "z" and site.head is None:
        raise ValueError(f"a hook_z sender is one head: Site({site.hook!r}, {site.position!r}, head=h)")


class FrozenOutputs:
    """A hook that writes, at every position of each chunk, the corrupted run's recorded output, except at
    ``sent`` (absolute position, head or None, values ``[batch, *rest]``: written) and ``free`` (absolute
    position, head or None: left as computed)."""

    def __init__(self, model: CODIModel, recorded: Tensor, sent: list, free: list):
        self.scope, self.recorded, self.sent, self.free = model.chunk_scope, recorded, sent, free

    def __call__(self, acts: Tensor, hook) -> Tensor:
        span = self.scope.current.span
        first, last = int(span[0]), int(span[-1])
        out = self.recorded[:, first : last + 1].to(device=acts.device, dtype=acts.dtype).clone()
        rows = torch.arange(acts.shape[0], device=acts.device)
        for where, head, _ in self.free:
            inside = (where >= first) & (where <= last)
            for i in torch.nonzero(inside).flatten().tolist():
                p = int(where[i]) - first
                if head is None:
                    out[i, p] = acts[i, p]
                else:
                    out[i, p, head] = acts[i, p, head]
        for where, head, values in self.sent:
            inside = (where >= first) & (where <= last)
            chosen = rows[inside.to(acts.device)]
            index = (where[inside] - first).to(acts.device)
            value = values[inside.to(values.device)].to(device=acts.device, dtype=acts.dtype)
            if head is None:
                out[chosen, index] = value
            else:
                out[chosen, index, head] = value[:, head] if value.dim() == out.dim() - 1 else value
        return out


def sender_values(site: Site, clean: PathRun) -> Float[Tensor, "batch ..."]:
    """The clean run's value of a sender at its named position, per example."""
    return gather_at(clean.outputs[site.hook], resolve(clean, site.position)[:, None])[:, 0]


def freeze_hooks(
    model: CODIModel,
    corrupted: PathRun,
    clean: PathRun | None,
    senders: Sequence[Site],
    receivers: Sequence[Site],
) -> Hooks:
    """The sender run's hooks: every head's and MLP's output frozen at the corrupted run's and every fed thought
    at the corrupted run's, except the senders (the clean run's value) and the receivers (computed)."""
    hooks: Hooks = []
    for name in component_names(model.cfg.n_layers):
        sent = [(resolve(corrupted, s.position), s.head, sender_values(s, clean)) for s in senders if s.hook == name]
        free = [(resolve(corrupted, r.position), r.head, None) for r in receivers if r.hook == name]
        if name == "hook_embed" and not sent:
            continue  # inputs change only where a sender writes them (fed thoughts are frozen below)
        hooks.append((name, FrozenOutputs(model, corrupted.outputs[name], sent, free)))
    fed_receivers = {parse_thought_hook(r.hook)[0] for r in receivers if r.kind == "thought_input"}
    for k in range(1, corrupted.positions.n_latents + 1):
        if k not in fed_receivers:
            value = corrupted.thoughts[:, k - 1]
            hooks.append((thought_hook_name(k, "input"), lambda z, hook, value=value: value.to(z.dtype).clone()))
    return hooks


class _Record:
    """Keeps what a hook computed at each example's receiver position (or the fed thought)."""

    def __init__(self, model: CODIModel, site: Site, run: PathRun):
        self.scope, self.site, self.value = model.chunk_scope, site, None
        self.where = None if site.kind == "thought_input" else resolve(run, site.position)

    def __call__(self, acts: Tensor, hook) -> None:
        if self.where is None:
            self.value = acts.detach().clone()
            return
        span = self.scope.current.span
        first, last = int(span[0]), int(span[-1])
        inside = (self.where >= first) & (self.where <= last)
        if bool(inside.all()):
            rows = torch.arange(acts.shape[0], device=acts.device)
            self.value = acts[rows, (self.where - first).to(acts.device)].detach().clone()
        elif bool(inside.any()):
            raise ValueError(f"receiver {self.site.id} falls in different chunks for different examples")


def _write_receivers(model: CODIModel, receivers: Sequence[Site], values: list[Tensor], run: PathRun) -> Hooks:
    """The receiver run's hooks: each receiver's value from the sender run written at its place."""
    hooks: Hooks = []
    for site, value in zip(receivers, values):
        if site.kind == "thought_input":
            hooks.append((site.hook, lambda z, hook, value=value: value.to(z.dtype).clone()))
            continue
        hooks.append((site.hook, _Writer(model, resolve(run, site.position), site.head, value)))
    return hooks


class _Writer:
    def __init__(self, model: CODIModel, where: Tensor, head: int | None, value: Tensor):
        self.scope, self.where, self.head, self.value = model.chunk_scope, where, head, value

    def __call__(self, acts: Tensor, hook) -> Tensor:
        span = self.scope.current.span
        first, last = int(span[0]), int(span[-1])
        inside = (self.where >= first) & (self.where <= last)
        if not bool(inside.any()):
            return acts
        out = acts.clone()
        rows = torch.nonzero(inside).flatten().to(acts.device)
        index = (self.where[inside] - first).to(acts.device)
        value = self.value[inside.to(self.value.device)].to(device=acts.device, dtype=acts.dtype)
        if self.head is None:
            out[rows, index] = value
        else:
            out[rows, index, self.head] = value[:, self.head]
        return out


def record_runs(
    model: CODIModel,
    batch: PairBatch,
    clean_questions: Sequence[str],
    corrupted_questions: Sequence[str],
    *,
    n_latents: int = 6,
) -> tuple[PathRun, PathRun]:
    """The clean and the corrupted runs of a batch of pairs, recorded for path patching (both teacher-forced on
    the clean answer); reuse them for every sender and receiver of the batch."""
    reading = batch_readings(batch)[0]
    return (
        record_run(model, clean_questions, reading.answers, reading.rows, n_latents),
        record_run(model, corrupted_questions, reading.answers, reading.rows, n_latents),
    )


def path_patch(
    model: CODIModel,
    batch: PairBatch,
    runs: tuple[PathRun, PathRun],
    senders: Sequence[Site],
    receivers: Sequence[Site] | str = ANSWER,
) -> Float[Tensor, " batch"]:
    """The batch metric (float64, ``[batch]``) when ``senders`` (the clean run's values) reach the answer only
    through ``receivers`` (``ANSWER`` or sites), every other path frozen at the corrupted run (see the module
    docstring). ``runs``: the (clean, corrupted) recordings of :func:`record_runs`."""
    for site in senders:
        check_sender(site)
    if batch.metric == "answer_logprob":
        raise ValueError("path patching reads one logit difference: use metric first_token or first_difference")
    if isinstance(receivers, str) and receivers != ANSWER:
        raise ValueError(f"receivers are sites or {ANSWER!r}, not {receivers!r}")
    reading = batch_readings(batch)[0]
    clean, corrupted = runs
    questions, n_latents = list(corrupted.questions), corrupted.positions.n_latents
    sites = [] if isinstance(receivers, str) else list(receivers)
    hooks = freeze_hooks(model, corrupted, clean, senders, sites)
    records = [_Record(model, site, corrupted) for site in sites]
    hooks += [(site.hook, record) for site, record in zip(sites, records)]
    with torch.no_grad():
        scores = model.score_answers(questions, reading.answers, n_latents=n_latents, fwd_hooks=hooks)
        if sites:
            written = _write_receivers(model, sites, [r.value for r in records], corrupted)
            scores = model.score_answers(questions, reading.answers, n_latents=n_latents, fwd_hooks=written)
    rows = torch.arange(len(questions))
    logits = scores.logits[rows, torch.tensor(reading.rows)].float()
    return metric_value(batch, [logits]).cpu()


@dataclass(frozen=True)
class Path:
    """A named path: senders (sent together) and the receivers their effect is let through."""

    name: str
    senders: tuple[Site, ...]
    receivers: tuple[Site, ...] | str = ANSWER
    group: str = ""


def site_label(site: Site) -> str:
    """``L1H2`` for a head, ``mlp1`` for an MLP, the site's id otherwise."""
    if site.kind == "z":
        return f"L{site.layer}H{site.head}"
    if site.kind == "mlp_out":
        return f"mlp{site.layer}"
    return site.id


#: The kinds of path a default path patching run measures (``--groups``).
PATH_GROUPS: Registry[str] = Registry("path group")
PATH_GROUPS.add("direct", "each head and each MLP at the answer row, straight to the logits")
PATH_GROUPS.add("head_to_last_mlp", "each head at the answer row, through the last layer's MLP there")
PATH_GROUPS.add("thought_to_heads", "each thought's fed input, through every head at the answer row")
PATH_GROUPS.add("recurrence", "each thought's fed input, into the next thought's input")


def default_paths(
    n_layers: int, n_heads: int, n_latents: int, groups: Sequence[str] = PATH_GROUPS.names()
) -> list[Path]:
    """The paths of ``groups`` (:data:`PATH_GROUPS`): each head and each MLP at the compared row straight to the
    answer (``direct``); each head there through the last layer's MLP there (``head_to_last_mlp``); each
    thought's fed input to the answer through the heads at the compared row (``thought_to_heads``); each
    thought's fed input to the next thought's input (``recurrence``). Each path is two runs of the corrupted
    questions: at the LLaMA-3.2-1B shape ``direct`` and ``head_to_last_mlp`` are 512 paths each."""
    row_heads = tuple(
        Site(act_name("z", layer), ANSWER_ROW, head=h) for layer in range(n_layers) for h in range(n_heads)
    )
    PATH_GROUPS.check(groups)
    paths = [Path(f"{site_label(s)} -> answer", (s,), ANSWER, "direct") for s in row_heads]
    paths += [
        Path(f"mlp{layer} -> answer", (Site(act_name("mlp_out", layer), ANSWER_ROW),), ANSWER, "direct")
        for layer in range(n_layers)
    ]
    last_mlp = (Site(act_name("mlp_out", n_layers - 1), ANSWER_ROW),)
    paths += [Path(f"{site_label(s)} -> mlp{n_layers - 1}", (s,), last_mlp, "head_to_last_mlp") for s in row_heads]
    for k in range(1, n_latents + 1):
        sender = (Site("hook_embed", f"thought:{k}"),)
        paths.append(Path(f"thought {k} -> heads at the answer", sender, row_heads, "thought_to_heads"))
        if k < n_latents:
            paths.append(
                Path(
                    f"thought {k} -> thought {k + 1}", sender, (Site(thought_hook_name(k + 1, "input")),), "recurrence"
                )
            )
    return [p for p in paths if p.group in groups]


def path_rows(
    model: CODIModel,
    pairs: pd.DataFrame,
    paths: Sequence[Path],
    *,
    n_latents: int = 6,
    max_new_tokens: int = 256,
    metric: str = DEFAULT_ANSWER_METRIC,
    answer_from: str = "model",
) -> pd.DataFrame:
    """Every path on a batch of pairs: one row per (pair, path) with ``path``, ``group``, ``logit_diff`` and
    ``recovery``, plus one row per skipped pair with its ``reason``."""
    batch, kept, skipped = prepare_pairs(
        model, pairs, [], n_latents=n_latents, max_new_tokens=max_new_tokens, metric=metric, answer_from=answer_from
    )
    frames = [skipped_rows(skipped)]
    if batch is None:
        return frames[0]
    runs = record_runs(
        model, batch, kept["clean_question"].tolist(), kept["corrupted_question"].tolist(), n_latents=n_latents
    )
    ids = kept["pair_id"].to_numpy()
    for path in paths:
        ld = path_patch(model, batch, runs, path.senders, path.receivers)
        frames.append(
            pd.DataFrame(
                {
                    UNIT_COLUMN: ids,
                    "pair_id": ids,
                    "path": path.name,
                    "group": path.group,
                    "logit_diff": ld.numpy(),
                    "ld_clean": batch.ld_clean.numpy(),
                    "ld_corrupted": batch.ld_corrupted.numpy(),
                    "recovery": normalised_recovery(ld, batch.ld_corrupted, batch.ld_clean),
                    "reason": "",
                }
            )
        )
    return pd.concat([f for f in frames if len(f)], ignore_index=True)


def path_sweep(
    model: CODIModel,
    pairs: pd.DataFrame,
    out: str | FilePath,
    *,
    paths: Sequence[Path] | None = None,
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
    """Every path (default: :func:`default_paths`) on every pair, resumable in ``out``; see :func:`path_rows`."""
    cfg = model.cfg
    paths = default_paths(cfg.n_layers, cfg.n_heads, n_latents) if paths is None else list(paths)
    return sweep_pairs(
        model,
        pairs,
        out,
        lambda batch: path_rows(
            model,
            batch,
            paths,
            n_latents=n_latents,
            max_new_tokens=max_new_tokens,
            metric=metric,
            answer_from=answer_from,
        ),
        {
            **(settings or {}),
            "paths": [p.name for p in paths],
            "n_latents": n_latents,
            "max_new_tokens": max_new_tokens,
            "metric": metric,
            "answer_from": answer_from,
        },
        desc="path patching",
        unit="path",
        size=len(paths),
        batch_size=batch_size,
        overwrite=overwrite,
        progress=progress,
        executor=executor,
    )
