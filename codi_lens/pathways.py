"""Feature pathways through the latent loop: which earlier features drive a feature of a later thought.

For a target feature of the SAE at one site (say feature 17 of ``thought.5.hook_hidden``), every feature
of SAEs at earlier sites (earlier layers of the same thought, or any layer of earlier thoughts: the
gradient crosses the feedback loop, thought k's last state -> projection -> input of thought k + 1) is
scored by gradient attribution, and the best candidates are checked by replay:

1. :func:`feature_attributions`: one run of the loop with every SAE spliced in with its error term (so
   the run is the model's own), with autograd; the target feature's activation is differentiated with
   respect to every source feature's activation. ``attribution = -activation * gradient`` is the linear
   estimate of the target's change when the source feature is ablated (set to 0), per problem.
2. :func:`replay`: for each candidate, the run again with that source feature really ablated; the
   target's actual change per problem.
3. :func:`pathway_agreement`: the correlation of predicted and actual changes over (candidate, problem)
   pairs, with a 95% bootstrap CI over problems.

The spliced sites are the identity for values and for gradients (see :mod:`codi_lens.saes.splice`), so the
gradient sees the same network the replay runs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from sae_lens import SAE
from torch import Tensor

from codi_lens.core import loop
from codi_lens.core.hooks import HookFn
from codi_lens.core.model import CODIModel
from codi_lens.core.sites import Site
from codi_lens.data.problems import Problem
from codi_lens.run.store import UNIT_COLUMN, ResultStore, batches_heard
from codi_lens.saes.edits import feature_edit
from codi_lens.saes.ids import feature_id, parse_feature_id
from codi_lens.saes.io import SAEError, sae_site
from codi_lens.saes.splice import at_site, attached, feature_recorder, recorded_features, recorded_site
from codi_lens.stats import bootstrap_ci, clustered_pearson_ci, pearson


def site_order(site: Site) -> tuple[int, float]:
    """When a site is computed in the loop: ``(thought, depth)``; depth -1 for a thought's input, the
    block index for ``blocks.L.*`` hooks, +inf for the thought's final state and projection."""
    if site.hook.endswith("hook_input"):
        return site.thought, -1.0
    if site.hook.startswith("blocks."):
        return site.thought, float(site.hook.split(".")[1])
    return site.thought, float("inf")


def _loop(
    model: CODIModel, questions: Sequence[str], through: int, n_latents: int, fwd_hooks: Sequence[tuple[str, HookFn]]
) -> None:
    """The latent loop (question + BOT, thoughts 1..``through``) under ``fwd_hooks``, no answer."""
    tokens, mask = loop.prepare(model, list(questions), n_latents)
    positions = loop.run_positions(model, mask, n_latents, [1] * len(questions))
    with loop.hooks_for_run(model, fwd_hooks, positions):
        loop.run_latents(model, tokens, mask, positions, through=through)


def feature_attributions(
    model: CODIModel,
    questions: Sequence[str],
    target: SAE,
    target_feature: int,
    sources: Sequence[SAE],
    *,
    n_latents: int = 6,
) -> tuple[pd.DataFrame, np.ndarray]:
    """Gradient attribution of ``target_feature`` to every feature of ``sources`` (see the module
    docstring). Returns one row per (problem, source site, source feature) active on that problem:
    ``problem, source_site, source_feature, source_id, activation, gradient, attribution``; and the target's
    activation per problem. Sources must be computed before the target (:func:`site_order`)."""
    target_site = sae_site(target)
    late = [s.id for s in map(sae_site, sources) if site_order(s) >= site_order(target_site)]
    if late:
        raise SAEError(f"source sites {late} are not computed before the target {target_site.id}")
    frame, values = many_target_attributions(model, questions, [(target, target_feature)], sources, n_latents=n_latents)
    return frame.drop(columns="target_id"), values[:, 0]


def many_target_attributions(
    model: CODIModel,
    questions: Sequence[str],
    targets: Sequence[tuple[SAE, int]],
    sources: Sequence[SAE],
    *,
    n_latents: int = 6,
) -> tuple[pd.DataFrame, np.ndarray]:
    """Gradient attribution of several target features, each to every feature of the ``sources`` computed before
    it (:func:`site_order`), from one forward pass with every SAE spliced in (error terms on) and one backward
    pass per target over the retained graph. Returns one row per (target, problem, source feature active on
    that problem): ``target_id`` (the target's feature id), ``problem, source_site, source_feature, source_id,
    activation, gradient, attribution``; and the targets' activations ``[n_problems, n_targets]``."""
    target_saes = list({id(sae): sae for sae, _ in targets}.values())
    through = max(sae_site(sae).thought for sae, _ in targets)
    sources = [s for s in sources if sae_site(s).thought <= through]  # later ones are never reached
    every = list({id(sae): sae for sae in [*sources, *target_saes]}.values())
    recorder, hooks = feature_recorder(model, every)
    frames, values = [], []
    with attached(model, every, use_error_term=True), torch.enable_grad():
        _loop(model, questions, through, n_latents, hooks)
        entries = {id(sae): recorded_site(recorder, sae) for sae in every}
        for number, (target, feature) in enumerate(targets):
            target_site = sae_site(target)
            value = at_site(*entries[id(target)])[:, feature]
            values.append(value.detach().float().cpu())
            earlier = [s for s in sources if site_order(sae_site(s)) < site_order(target_site)]
            if not earlier:
                continue
            grads = torch.autograd.grad(
                value.sum(),
                [entries[id(s)][0] for s in earlier],
                allow_unused=True,
                retain_graph=number < len(targets) - 1,
            )
            for source, grad in zip(earlier, grads):
                tensor, index = entries[id(source)]
                frame = _attribution_rows(sae_site(source), at_site(tensor, index).detach().float(), grad, index)
                frames.append(frame.assign(target_id=feature_id(target_site, feature)))
    columns = ["problem", "source_site", "source_feature", "source_id", "activation", "gradient", "attribution"]
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=[*columns, "target_id"])
    return table, torch.stack(values, 1).numpy()


def _attribution_rows(site: Site, acts: Tensor, grad: Tensor | None, index: int | None) -> pd.DataFrame:
    """One row per (problem, feature) active at ``site``: activation, gradient and ``-activation * gradient``."""
    grad = torch.zeros_like(acts) if grad is None else at_site(grad, index).float()
    problem, feature = torch.nonzero(acts > 0, as_tuple=True)
    a, g = acts[problem, feature].cpu(), grad[problem, feature].cpu()
    return pd.DataFrame(
        {
            "problem": problem.cpu().numpy(),
            "source_site": site.id,
            "source_feature": feature.cpu().numpy(),
            "source_id": [feature_id(site, f) for f in feature.tolist()],
            "activation": a.numpy(),
            "gradient": g.numpy(),
            "attribution": (-a * g).numpy(),
        }
    )


def _batched_attributions(
    model: CODIModel,
    questions: list[str],
    batch_size: int,
    choice: PathwayChoice,
    feature: int,
    n_latents: int,
    progress: bool,
) -> pd.DataFrame:
    """:func:`feature_attributions` over batches of questions, problem indices counted across batches."""
    frames, offset = [], 0
    for batch in batches_heard(questions, batch_size, model=model, desc="gradients", progress=progress):
        frame, _ = feature_attributions(model, batch, choice.target, feature, choice.sources, n_latents=n_latents)
        frames.append(frame.assign(problem=frame["problem"] + offset))
        offset += len(batch)
    return pd.concat(frames, ignore_index=True)


def top_candidates(attributions: pd.DataFrame, n_problems: int, k: int) -> pd.DataFrame:
    """The ``k`` (source site, feature) pairs with the largest mean absolute attribution over problems
    (inactive problems count as 0): ``source_site, source_feature, source_id, mean_attribution, mean_abs``
    (:func:`candidates_per_target` for the one target)."""
    one = attributions.assign(target_id="target")
    if "source_id" not in one:  # attributions.parquet of a run made before feature ids, resumed
        one["source_id"] = [feature_id(s, f) for s, f in zip(one["source_site"], one["source_feature"])]
    return candidates_per_target(one, n_problems, k).drop(columns="target_id")


@torch.no_grad()
def target_activation(
    model: CODIModel,
    questions: Sequence[str],
    target: SAE,
    target_feature: int | None,
    saes: Sequence[SAE],
    *,
    fwd_hooks: Sequence[tuple[str, HookFn]] = (),
    n_latents: int = 6,
) -> np.ndarray:
    """The target feature's activation per problem ``[n]`` (every feature's, ``[n, d_sae]``, for
    ``target_feature=None``) with ``saes`` (the target among them) spliced in with their error terms,
    under ``fwd_hooks`` (e.g. a source feature's ablation)."""
    recorder, hooks = feature_recorder(model, [target])
    with attached(model, list(saes), use_error_term=True):
        _loop(model, questions, sae_site(target).thought, n_latents, [*fwd_hooks, *hooks])
    acts = recorded_features(recorder, target).float().cpu()
    return (acts if target_feature is None else acts[:, target_feature]).numpy()


def replay(
    model: CODIModel,
    questions: Sequence[str],
    target: SAE,
    target_feature: int,
    sources: Sequence[SAE],
    candidates: pd.DataFrame,
    *,
    clean: np.ndarray | None = None,
    n_latents: int = 6,
) -> pd.DataFrame:
    """Ablate each candidate source feature for real and measure the target: one row per (candidate,
    problem) with ``actual`` (target activation ablated minus ``clean``, the unablated activation per
    problem, computed here when not given)."""
    by_site = {sae_site(s).id: s for s in sources}
    saes = [*sources, target]
    if clean is None:
        clean = target_activation(model, questions, target, target_feature, saes, n_latents=n_latents)
    frames = []
    for row in candidates.itertuples():
        edit = feature_edit(by_site[row.source_site], [int(row.source_feature)], "ablate")
        ablated = target_activation(model, questions, target, target_feature, saes, fwd_hooks=edit, n_latents=n_latents)
        frames.append(
            pd.DataFrame(
                {
                    "problem": np.arange(len(questions)),
                    "source_site": row.source_site,
                    "source_feature": int(row.source_feature),
                    "actual": ablated - clean,
                }
            )
        )
    return pd.concat(frames, ignore_index=True)


def pathway_agreement(
    attributions: pd.DataFrame, replayed: pd.DataFrame, *, n_resamples: int = 2000, seed: int = 0
) -> tuple[pd.DataFrame, dict]:
    """Predicted (attribution; 0 where the source was inactive) against actual change per (candidate,
    problem), and their Pearson correlation with a 95% percentile bootstrap CI over problems (every candidate
    of a drawn problem goes with it: :func:`~codi_lens.stats.clustered_pearson_ci`). Returns the joined table
    and ``{"pearson", "low", "high", "n_pairs", "n_problems"}``."""
    keys = ["problem", "source_site", "source_feature"]
    joined = replayed.merge(attributions[[*keys, "attribution"]], on=keys, how="left")
    joined["predicted"] = joined["attribution"].fillna(0.0)
    estimate, low, high = clustered_pearson_ci(
        joined["predicted"], joined["actual"], joined["problem"], n_resamples=n_resamples, seed=seed
    )
    summary = {
        "pearson": estimate,
        "low": low,
        "high": high,
        "n_pairs": len(joined),
        "n_problems": int(joined["problem"].nunique()),
    }
    return joined.drop(columns="attribution"), summary


@dataclass
class PathwayChoice:
    """The target SAE of a pathway study and its sources (one SAE per hook, all computed before the target)."""

    target_id: str
    target: SAE
    source_ids: list[str]
    sources: list[SAE]


def choose_pathway(
    saes: dict[str, SAE], target_id: str | None = None, source_ids: Sequence[str] | None = None
) -> PathwayChoice:
    """The target (default: the SAE computed last in the loop) and its sources (default: every SAE computed
    before it; of two at one hook, the first id). ``SAEError`` names a target or source that does not fit."""
    target_id = target_id or max(saes, key=lambda i: site_order(sae_site(saes[i])))
    if target_id not in saes:
        raise SAEError(f"the target {target_id!r} is not among the SAEs: {sorted(saes)}")
    target = saes[target_id]
    earlier = [i for i in saes if site_order(sae_site(saes[i])) < site_order(sae_site(target))]
    source_ids = list(source_ids) if source_ids else earlier
    late = [i for i in source_ids if i not in earlier]
    if late or not source_ids:
        raise SAEError(f"sources {late or 'none'} are not SAEs computed before {target_id} (those are {earlier})")
    by_hook: dict[str, str] = {}
    for i in source_ids:
        by_hook.setdefault(sae_site(saes[i]).hook, i)
    return PathwayChoice(target_id, target, list(by_hook.values()), [saes[i] for i in by_hook.values()])


def pathway_study(
    model: CODIModel,
    problems: list[Problem],
    choice: PathwayChoice,
    out: str | Path,
    *,
    target_feature: int | None = None,
    n_candidates: int = 20,
    n_latents: int = 6,
    batch_size: int = 16,
    settings: dict[str, Any] | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> tuple[pd.DataFrame, dict, pd.DataFrame, ResultStore]:
    """Steps 1-3 of the module docstring for one target feature (default: the target SAE's most frequent on
    these problems), resumable in ``out``: ``attributions.parquet`` (kept), ``candidates.parquet``, and the
    replays as units of the store. The baseline and the gradients run ``batch_size`` problems at a time (each
    problem's gradient is its own, so batching changes nothing), each with a bar that moves per block.
    Returns the joined predicted/actual table (``problem_id`` added), the agreement (with
    ``target_feature``), the candidates and the store."""
    out = Path(out)
    questions = [p.question for p in problems]
    saes = [*choice.sources, choice.target]
    attributions_file = out / "attributions.parquet"
    # Every target feature on every problem, unablated: picks the default feature, the replays' baseline.
    parts = [
        target_activation(model, batch, choice.target, None, saes, n_latents=n_latents)
        for batch in batches_heard(questions, batch_size, model=model, desc="baseline", progress=progress)
    ]
    every = np.concatenate(parts)
    feature = target_feature if target_feature is not None else int((every > 0).mean(axis=0).argmax())
    store = ResultStore(out, {**(settings or {}), "target_feature": feature}, overwrite=overwrite)
    if attributions_file.exists():
        attributions = pd.read_parquet(attributions_file)
    else:
        attributions = _batched_attributions(model, questions, batch_size, choice, feature, n_latents, progress)
        attributions.to_parquet(attributions_file, index=False)
    candidates = top_candidates(attributions, len(problems), n_candidates)
    candidates.to_parquet(out / "candidates.parquet", index=False)

    def work(batch: list[tuple[str, int]]) -> pd.DataFrame:
        chosen = candidates.set_index(["source_site", "source_feature"]).loc[batch].reset_index()
        rows = replay(
            model,
            questions,
            choice.target,
            feature,
            choice.sources,
            chosen,
            clean=every[:, feature],
            n_latents=n_latents,
        )
        return rows.assign(**{UNIT_COLUMN: rows["source_site"] + "/" + rows["source_feature"].astype(str)})

    units = list(zip(candidates["source_site"], candidates["source_feature"].astype(int)))
    replayed = store.run(
        units, work, unit_id=lambda u: f"{u[0]}/{u[1]}", batch_size=1, desc="replays", unit="replay", model=model
    )
    joined, agreement = pathway_agreement(attributions, replayed.drop(columns=UNIT_COLUMN))
    joined["problem_id"] = [problems[i].id for i in joined["problem"]]
    return joined, {**agreement, "target_feature": feature}, candidates, store


# ---------------------------------------------------------------------- many targets in one study
#: The rule a pathway is validated by (written into every pathways table's docs and the report).
VALIDATION_RULE = (
    "the replayed mean change of the target has a 95% bootstrap CI (over problems) that excludes 0 and the same "
    "sign as the predicted mean change"
)


def attributions_for_targets(
    model: CODIModel,
    problems: Sequence[Problem],
    saes: Mapping[str, SAE],
    targets: Sequence[str],
    *,
    n_latents: int = 6,
    batch_size: int = 16,
    progress: bool = True,
) -> pd.DataFrame:
    """:func:`many_target_attributions` for the ``targets`` (feature ids) against every SAE of ``saes`` (site id ->
    SAE) computed before each, ``batch_size`` problems per forward, problem indices counted across batches."""
    by_site = dict(saes)
    resolved = []
    for target in targets:
        site, feature = parse_feature_id(target)
        if site.id not in by_site:
            raise SAEError(f"the target {target} has no SAE at {site.id}; the SAEs are at {sorted(by_site)}")
        resolved.append((by_site[site.id], feature))
    questions = [p.question for p in problems]
    frames, offset = [], 0
    for batch in batches_heard(questions, batch_size, model=model, desc="gradients", progress=progress):
        frame, _ = many_target_attributions(model, batch, resolved, list(by_site.values()), n_latents=n_latents)
        frames.append(frame.assign(problem=frame["problem"] + offset))
        offset += len(batch)
    return pd.concat(frames, ignore_index=True)


def candidates_per_target(
    attributions: pd.DataFrame, n_problems: int, k: int, *, threshold: float = 0.0, adjacent: bool = False
) -> pd.DataFrame:
    """Per target, the ``k`` source features with the largest mean |attribution| over problems (inactive problems
    count as 0) of at least ``threshold``; ``adjacent``: only sources at the thought just before the target's.
    Columns ``target_id, source_id, source_site, source_feature, mean_attribution, mean_abs``."""
    table = attributions.assign(absolute=attributions["attribution"].abs())
    if adjacent:
        source = table["source_id"].map(lambda i: parse_feature_id(i)[0].thought)
        target = table["target_id"].map(lambda i: parse_feature_id(i)[0].thought)
        table = table[source == target - 1]
    grouped = table.groupby(["target_id", "source_id", "source_site", "source_feature"], as_index=False).agg(
        mean_attribution=("attribution", "sum"), mean_abs=("absolute", "sum")
    )
    grouped[["mean_attribution", "mean_abs"]] /= n_problems
    grouped = grouped[grouped["mean_abs"] >= threshold]
    ranked = grouped.sort_values(["target_id", "mean_abs", "source_id"], ascending=[True, False, True], kind="stable")
    return ranked.groupby("target_id").head(k).reset_index(drop=True)


@torch.no_grad()
def replay_source(
    model: CODIModel,
    questions: Sequence[str],
    saes: Mapping[str, SAE],
    source: str,
    targets: Sequence[str],
    *,
    n_latents: int = 6,
) -> Float[Tensor, "n_problems n_targets"]:
    """Every target feature's activation per problem with ``source`` ablated (all of ``saes`` spliced in with
    their error terms; ``source=None``: nothing ablated), ``[n_problems, n_targets]``."""
    parsed = [parse_feature_id(t) for t in targets]
    target_saes = list({site.id: saes[site.id] for site, _ in parsed}.values())
    recorder, hooks = feature_recorder(model, target_saes)
    edit = []
    if source is not None:
        site, feature = parse_feature_id(source)
        edit = feature_edit(saes[site.id], [feature], "ablate")
    with attached(model, list(saes.values()), use_error_term=True):
        _loop(model, questions, max(site.thought for site, _ in parsed), n_latents, [*edit, *hooks])
    by_site = {sae_site(sae).id: recorded_features(recorder, sae).float().cpu() for sae in target_saes}
    return torch.stack([by_site[site.id][:, feature] for site, feature in parsed], 1)


def pathway_table(joined: pd.DataFrame, *, n_resamples: int = 2000, seed: int = 0) -> pd.DataFrame:
    """One row per (target, source) pathway: ``predicted`` and ``replayed`` mean change of the target over
    problems, the replayed 95% bootstrap CI ``low``/``high``, their per-problem Pearson ``agreement``, and
    ``validated`` (:data:`VALIDATION_RULE`)."""
    columns = ["target_id", "source_id", "predicted", "replayed", "low", "high", "agreement", "validated"]
    rows = []
    for (target, source), group in joined.groupby(["target_id", "source_id"], sort=True):
        replayed, low, high = bootstrap_ci(group["actual"].to_numpy(), n_resamples=n_resamples, seed=seed)
        predicted = float(group["predicted"].mean())
        excludes_zero = (low > 0 or high < 0) if np.isfinite(low) else False
        rows.append(
            {
                "target_id": target,
                "source_id": source,
                "predicted": predicted,
                "replayed": replayed,
                "low": low,
                "high": high,
                "agreement": pearson(group["predicted"], group["actual"]),
                "validated": bool(excludes_zero and np.sign(predicted) == np.sign(replayed)),
            }
        )
    return pd.DataFrame(rows, columns=columns)


def agreement_table(joined: pd.DataFrame) -> pd.DataFrame:
    """The Pearson correlation of predicted and replayed change over (candidate, problem) pairs, per target and
    pooled (``target_id = "pooled"``), with 95% bootstrap CIs over problems."""
    rows = []
    for target, group in [*joined.groupby("target_id", sort=True), ("pooled", joined)] if len(joined) else []:
        r, low, high = clustered_pearson_ci(group["predicted"], group["actual"], group["problem"])
        rows.append({"target_id": target, "pearson": r, "low": low, "high": high, "n_pairs": len(group)})
    return pd.DataFrame(rows, columns=["target_id", "pearson", "low", "high", "n_pairs"])


@dataclass
class PathwayStudy:
    """What :func:`study_pathways` produced.

    Attributes:
        joined: one row per (target, candidate source, problem): ``target_id, source_id, problem, problem_id,
            predicted, actual``.
        pathways: one row per (target, source) (:func:`pathway_table`).
        agreement: per target and pooled (:func:`agreement_table`).
        candidates: the candidates (:func:`candidates_per_target`).
    """

    joined: pd.DataFrame
    pathways: pd.DataFrame
    agreement: pd.DataFrame
    candidates: pd.DataFrame


def study_pathways(
    model: CODIModel,
    problems: list[Problem],
    saes: Mapping[str, SAE],
    targets: Sequence[str],
    out: str | Path,
    *,
    n_candidates: int = 10,
    threshold: float = 0.0,
    adjacent: bool = False,
    n_latents: int = 6,
    batch_size: int = 16,
    settings: dict[str, Any] | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> tuple[PathwayStudy, ResultStore]:
    """Pathways to many target features (feature ids) at once, resumable in ``out``: the attributions of every
    target from one forward and one backward per target per batch (``attributions.parquet``, kept), the top
    candidates per target (``candidates.parquet``), and one replay per distinct candidate source that measures
    every target at once (the units of the store)."""
    out = Path(out)
    store = ResultStore(out, {**(settings or {}), "targets": list(targets)}, overwrite=overwrite)
    questions = [p.question for p in problems]
    attributions_file = out / "attributions.parquet"
    if attributions_file.exists():
        attributions = pd.read_parquet(attributions_file)
    else:
        attributions = attributions_for_targets(
            model, problems, saes, targets, n_latents=n_latents, batch_size=batch_size, progress=progress
        )
        attributions.to_parquet(attributions_file, index=False)
    candidates = candidates_per_target(
        attributions, len(problems), n_candidates, threshold=threshold, adjacent=adjacent
    )
    candidates.to_parquet(out / "candidates.parquet", index=False)
    sources = sorted(set(candidates["source_id"]))
    clean: list[Tensor] = []  # every target unablated, computed on first use

    def measured(source: str | None) -> Tensor:
        parts = [
            replay_source(model, questions[i : i + batch_size], saes, source, targets, n_latents=n_latents)
            for i in range(0, len(questions), batch_size)
        ]
        return torch.cat(parts)

    def work(batch: list[str]) -> pd.DataFrame:
        if not clean:
            clean.append(measured(None))
        frames = []
        for source in batch:
            change = (measured(source) - clean[0]).numpy()
            mine = candidates[candidates["source_id"] == source]
            for target in mine["target_id"]:
                column = change[:, list(targets).index(target)]
                frames.append(
                    pd.DataFrame(
                        {
                            UNIT_COLUMN: source,
                            "target_id": target,
                            "source_id": source,
                            "problem": np.arange(len(problems)),
                            "actual": column,
                        }
                    )
                )
        return pd.concat(frames, ignore_index=True)

    replayed = store.run(
        sources, work, unit_id=str, batch_size=1, desc="replays", unit="source", model=model, progress=progress
    )
    replayed = replayed.drop(columns=UNIT_COLUMN) if len(replayed) else replayed
    keys = ["target_id", "source_id", "problem"]
    if len(replayed):
        joined = replayed.merge(attributions[[*keys, "attribution"]], on=keys, how="left")
        joined["predicted"] = joined.pop("attribution").fillna(0.0)
        joined["problem_id"] = [problems[int(i)].id for i in joined["problem"]]
    else:
        joined = pd.DataFrame(columns=[*keys, "actual", "predicted", "problem_id"])
    study = PathwayStudy(joined, pathway_table(joined), agreement_table(joined), candidates)
    return study, store
