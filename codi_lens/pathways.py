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

The spliced sites are the identity for values and for gradients (see ``codi_lens.saes``), so the
gradient sees the same network the replay runs.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import scipy.stats
import torch
from sae_lens import SAE
from torch import Tensor

from codi_lens.activations import Site
from codi_lens.model import CODIModel
from codi_lens.saes import SAEError, attached, feature_edit, sae_acts_hook_name, sae_site


def site_order(site: Site) -> tuple[int, float]:
    """When a site is computed in the loop: ``(thought, depth)``; depth -1 for a thought's input, the
    block index for ``blocks.L.*`` hooks, +inf for the thought's final state and projection."""
    if site.hook.endswith("hook_input"):
        return site.thought, -1.0
    if site.hook.startswith("blocks."):
        return site.thought, float(site.hook.split(".")[1])
    return site.thought, float("inf")


def _loop(model: CODIModel, questions: Sequence[str], through: int, n_latents: int, fwd_hooks) -> None:
    """The latent loop (question + BOT, thoughts 1..``through``) under ``fwd_hooks``, no answer."""
    tokens, mask = model._prepare(list(questions), n_latents)  # noqa: SLF001 - the loop's own steps
    layout = model._layout(mask, n_latents, [1] * len(questions))  # noqa: SLF001
    with model._hooks_for_run(fwd_hooks, layout):  # noqa: SLF001
        state, z = model._run_prompt(tokens, mask, layout, keep_logits=False)  # noqa: SLF001
        if through >= 1:
            model._run_thoughts(state, z, keep_logits=False, last=through)  # noqa: SLF001


def _recorder(model: CODIModel, site: Site, store: dict):
    """A hook keeping the feature activations of an SAE at ``site`` in ``store[site]``: the whole tensor
    (so gradients can be taken with respect to it) and the index of the site's thought in it."""

    def record(acts: Tensor, hook) -> Tensor:
        if site.position is None:
            store[site] = (acts, None)
            return acts
        index = int(model.chunk_context.index_in_chunk(site.position)[0])  # thought positions align across rows
        if index >= 0:
            store[site] = (acts, index)
        return acts

    return record


def _recording(model: CODIModel, saes: Sequence[SAE], store: dict) -> list[tuple]:
    """``fwd_hooks`` recording the feature activations of each SAE (see :func:`_recorder`)."""
    return [(sae_acts_hook_name(sae), _recorder(model, sae_site(sae), store)) for sae in saes]


def _read(entry: tuple[Tensor, int | None]) -> Tensor:
    acts, index = entry
    return acts if index is None else acts[:, index]


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
    ``problem, source_site, source_feature, activation, gradient, attribution``; and the target's
    activation per problem. Sources must be computed before the target (:func:`site_order`)."""
    target_site = sae_site(target)
    source_sites = [sae_site(s) for s in sources]
    late = [s.id for s in source_sites if site_order(s) >= site_order(target_site)]
    if late:
        raise SAEError(f"source sites {late} are not computed before the target {target_site.id}")
    store: dict = {}
    with attached(model, [*sources, target], use_error_term=True), torch.enable_grad():
        _loop(model, questions, target_site.thought, n_latents, _recording(model, [*sources, target], store))
        value = _read(store[target_site])[:, target_feature]
        tensors = [store[s][0] for s in source_sites]
        grads = torch.autograd.grad(value.sum(), tensors, allow_unused=True)
    frames = []
    for site, grad in zip(source_sites, grads):
        acts = _read(store[site]).detach().float()
        grad = torch.zeros_like(acts) if grad is None else _read((grad, store[site][1])).float()
        problem, feature = torch.nonzero(acts > 0, as_tuple=True)
        a, g = acts[problem, feature], grad[problem, feature]
        frames.append(
            pd.DataFrame(
                {
                    "problem": problem.numpy(),
                    "source_site": site.id,
                    "source_feature": feature.numpy(),
                    "activation": a.numpy(),
                    "gradient": g.numpy(),
                    "attribution": (-a * g).numpy(),
                }
            )
        )
    return pd.concat(frames, ignore_index=True), value.detach().float().cpu().numpy()


def top_candidates(attributions: pd.DataFrame, n_problems: int, k: int) -> pd.DataFrame:
    """The ``k`` (source site, feature) pairs with the largest mean absolute attribution over problems
    (inactive problems count as 0): ``source_site, source_feature, mean_attribution, mean_abs``."""
    grouped = attributions.groupby(["source_site", "source_feature"])
    table = pd.DataFrame(
        {
            "mean_attribution": grouped["attribution"].sum() / n_problems,
            "mean_abs": grouped["attribution"].apply(lambda x: x.abs().sum()) / n_problems,
        }
    ).reset_index()
    return table.sort_values("mean_abs", ascending=False, kind="stable").head(k).reset_index(drop=True)


@torch.no_grad()
def target_activation(
    model: CODIModel,
    questions: Sequence[str],
    target: SAE,
    target_feature: int | None,
    saes: Sequence[SAE],
    *,
    fwd_hooks: Sequence[tuple] = (),
    n_latents: int = 6,
) -> np.ndarray:
    """The target feature's activation per problem ``[n]`` (every feature's, ``[n, d_sae]``, for
    ``target_feature=None``) with ``saes`` (the target among them) spliced in with their error terms,
    under ``fwd_hooks`` (e.g. a source feature's ablation)."""
    site = sae_site(target)
    store: dict = {}
    with attached(model, list(saes), use_error_term=True):
        _loop(model, questions, site.thought, n_latents, [*fwd_hooks, *_recording(model, [target], store)])
    acts = _read(store[site]).float().cpu()
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
    problem), and their Pearson correlation with a 95% percentile bootstrap CI over problems
    (``scipy.stats.bootstrap`` resampling problem indices; all candidates of a drawn problem go
    together). Returns the joined table and ``{"pearson", "low", "high", "n_pairs", "n_problems"}``."""
    keys = ["problem", "source_site", "source_feature"]
    joined = replayed.merge(attributions[[*keys, "attribution"]], on=keys, how="left")
    joined["predicted"] = joined["attribution"].fillna(0.0)
    problems = np.sort(joined["problem"].unique())
    groups = {p: g for p, g in joined.groupby("problem")}

    def pearson(index: np.ndarray) -> float:
        part = pd.concat([groups[problems[int(i)]] for i in index])
        if part["predicted"].std() == 0 or part["actual"].std() == 0:
            return float("nan")
        return float(np.corrcoef(part["predicted"], part["actual"])[0, 1])

    estimate = pearson(np.arange(len(problems)))
    low = high = float("nan")
    if len(problems) > 2 and np.isfinite(estimate):
        result = scipy.stats.bootstrap(
            (np.arange(len(problems)),),
            pearson,
            n_resamples=n_resamples,
            method="percentile",
            vectorized=False,
            random_state=np.random.default_rng(seed),
        )
        low, high = float(result.confidence_interval.low), float(result.confidence_interval.high)
    summary = {
        "pearson": estimate,
        "low": low,
        "high": high,
        "n_pairs": len(joined),
        "n_problems": len(problems),
    }
    return joined.drop(columns="attribution"), summary
