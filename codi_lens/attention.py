"""Attention to the continuous thoughts, read from the stitched cache of a CODI run.

Positions follow :mod:`codi_lens.core.positions`: ``thought = 0`` is BOT, ``thought = k`` the position fed
the k-th continuous thought. Patterns come from ``blocks.L.attn.hook_pattern``
(``[batch, head, query_pos, key_pos]``, one row per query head; with grouped-query attention the
``kv_head`` column names the key/value head a query head shares with its group).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from scipy import stats
from transformer_lens import ActivationCache

from codi_lens.core.names import act_name
from codi_lens.core.positions import CODIPositions
from codi_lens.stats import benjamini_hochberg, cluster_permutation_pvalue, clustered_bootstrap_ci, pearson


def pattern_hook_names(n_layers: int) -> list[str]:
    """The cache names :func:`attention_to_thoughts` needs (a ``names_filter``)."""
    return [act_name("pattern", layer) for layer in range(n_layers)]


def _pattern_layers(cache: ActivationCache) -> list[int]:
    """The layers whose attention pattern the cache holds, in layer order."""
    layers = sorted(int(name.split(".")[1]) for name in cache.cache_dict if name.endswith("attn.hook_pattern"))
    if not layers:
        raise KeyError("the cache holds no attention patterns (cache blocks.L.attn.hook_pattern)")
    return layers


def _long_frame(weights: torch.Tensor, axes: Sequence[str], **constant) -> pd.DataFrame:
    """A ``[d0, d1, d2]`` weight array as one row per index triple: columns ``axes`` and ``weight``."""
    grids = np.meshgrid(*[np.arange(n) for n in weights.shape], indexing="ij")
    columns = {name: grid.ravel() for name, grid in zip(axes, grids)}
    return pd.DataFrame({**constant, **columns, "weight": weights.numpy().ravel()})


def _thought_names(n_latents: int) -> list[str]:
    return ["bot", *[f"thought:{k}" for k in range(1, n_latents + 1)]]


def attention_to_thoughts(
    cache: ActivationCache,
    positions: CODIPositions,
    problem_ids: Sequence[str],
    *,
    n_kv_heads: int | None = None,
) -> pd.DataFrame:
    """Attention from EOT and from each fed answer position to BOT and every thought.

    One row per (problem, layer, head, source, thought): ``source`` is ``"eot"`` or ``"answer:j"``
    (the position holding answer token j), ``thought`` 0 = BOT .. n, ``weight`` the attention
    probability. ``kv_head`` is ``head // (n_heads / n_kv_heads)``.
    """
    targets = positions.resolve(_thought_names(positions.n_latents))  # [batch, n + 1]
    eot = positions.resolve(["eot"])[:, 0]
    frames = []
    for layer in _pattern_layers(cache):
        pattern = cache[act_name("pattern", layer)].float().cpu()  # [batch, head, q, k]
        group = pattern.shape[1] // (n_kv_heads or pattern.shape[1])
        for i, problem_id in enumerate(problem_ids):
            n_fed = max(positions.answer_lengths[i] - 1, 0)
            names = ["eot"] + [f"answer:{j}" for j in range(n_fed)]
            queries = torch.tensor([int(eot[i])] + [positions.answer_start + j for j in range(n_fed)])
            weights = pattern[i][:, queries][:, :, targets[i]]  # [head, source, n + 1]
            frame = _long_frame(weights, ["head", "source", "thought"], problem_id=problem_id, layer=layer)
            frame.insert(3, "kv_head", frame["head"] // group)
            frame["source"] = np.asarray(names, dtype=object)[frame["source"].to_numpy()]
            frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def thought_to_thought(cache: ActivationCache, positions: CODIPositions, problem_ids: Sequence[str]) -> pd.DataFrame:
    """The (n+1) x (n+1) attention among BOT and the thoughts, per problem, layer and head: one row per
    (problem, layer, head, query_thought, key_thought) with ``weight`` (0 above the diagonal)."""
    targets = positions.resolve(_thought_names(positions.n_latents))
    frames = []
    for layer in _pattern_layers(cache):
        pattern = cache[act_name("pattern", layer)].float().cpu()
        for i, problem_id in enumerate(problem_ids):
            block = pattern[i][:, targets[i]][:, :, targets[i]]  # [head, n + 1, n + 1]
            axes = ["head", "query_thought", "key_thought"]
            frames.append(_long_frame(block, axes, problem_id=problem_id, layer=layer))
    return pd.concat(frames, ignore_index=True)


def correlation_by_layer(
    frame: pd.DataFrame,
    x: str,
    y: str,
    *,
    by: str | Sequence[str] = "layer",
    cluster: str = "problem_id",
    within: str = "thought",
    n_resamples: int = 1000,
    seed: int = 0,
) -> pd.DataFrame:
    """Pearson and Spearman correlation of ``x`` and ``y`` per ``by`` group, each with a 95% percentile
    bootstrap CI that resamples whole problems (rows of one problem move together).

    Returns one row per group: ``n_rows, n_problems, pearson, pearson_low, pearson_high, spearman,
    spearman_low, spearman_high``, ``p_permutation`` (Spearman's, two-sided: each problem's ``x`` paired with
    another problem's ``y``, the rows of a problem kept in ``within`` order, see
    :func:`~codi_lens.stats.cluster_permutation_pvalue`) and its Benjamini-Hochberg ``q`` and ``significant``
    across the groups. A constant column gives NaN.
    """
    out = []
    keys = [by] if isinstance(by, str) else list(by)
    for key, group in frame.groupby(keys, sort=True):
        order = [within] if within in group and within not in keys else []
        group = group[[cluster, *order, x, y]].dropna().reset_index(drop=True)
        row = {**dict(zip(keys, key)), "n_rows": len(group), "n_problems": group[cluster].nunique()}
        for name, fn in (("pearson", pearson), ("spearman", _spearman)):
            estimate, low, high = clustered_bootstrap_ci(
                group, fn, [x, y], cluster=cluster, n_resamples=n_resamples, seed=seed
            )
            row.update({name: estimate, f"{name}_low": low, f"{name}_high": high})
        row["p_permutation"] = _permutation_p(group, cluster, order, x, y, seed)
        out.append(row)
    table = pd.DataFrame(out)
    table["significant"], table["q"] = benjamini_hochberg(table["p_permutation"].to_numpy(dtype=float))
    return table


def _permutation_p(group: pd.DataFrame, cluster: str, order: list[str], x: str, y: str, seed: int) -> float:
    """Spearman's permutation p-value with problems as the exchangeable units (problems missing a row dropped)."""
    if group[cluster].nunique() < 3:
        return float("nan")  # nothing to permute (a random model's answers may leave no KL at all)
    if order:
        wide = group.pivot_table(index=cluster, columns=order[0], values=[x, y], aggfunc="first").dropna()
        xs, ys = wide[x].to_numpy(), wide[y].to_numpy()
    else:
        first = group.groupby(cluster, sort=False)[[x, y]].first()
        xs, ys = first[[x]].to_numpy(), first[[y]].to_numpy()
    return cluster_permutation_pvalue(xs, ys, _spearman, n_resamples=2000, seed=seed)


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of the ranks (ties get their average rank), as ``scipy.stats.spearmanr``."""
    return pearson(stats.rankdata(a), stats.rankdata(b))


def mean_attention(frame: pd.DataFrame, by: Sequence[str] = ("problem_id", "layer", "thought")) -> pd.DataFrame:
    """Mean attention weight over heads and sources, per ``by`` (``weight`` column)."""
    return frame.groupby(list(by), sort=False)["weight"].mean().reset_index()


def per_thought(rows: pd.DataFrame) -> pd.DataFrame:
    """One row per (problem, layer, thought 1..n): attention averaged over heads and over the EOT and
    answer sources, with the thought's KL; plus ``kl_other``: the next problem's KL at that thought."""
    thoughts = rows[rows["thought"] > 0].copy()
    thoughts["attention"] = thoughts[["attention_eot", "attention_answer"]].mean(axis=1, skipna=True)
    frame = (
        thoughts.groupby(["problem_id", "layer", "thought"], sort=False)
        .agg(attention=("attention", "mean"), kl=("kl", "first"))
        .reset_index()
    )
    ids = list(dict.fromkeys(frame["problem_id"]))
    other = dict(zip(ids, np.roll(ids, -1)))
    kl_of = frame.drop_duplicates(["problem_id", "thought"]).set_index(["problem_id", "thought"])["kl"]
    frame["kl_other"] = [kl_of.get((other[p], t), np.nan) for p, t in zip(frame["problem_id"], frame["thought"])]
    return frame


def question_to_thought(
    cache: ActivationCache,
    positions: CODIPositions,
    problem_ids: Sequence[str],
    number_tokens: Sequence[list[list[int]]],
) -> pd.DataFrame:
    """Which question tokens BOT and each thought attend to, per problem, layer and head: one row per (problem,
    layer, head, thought, target) with ``weight``, the attention mass on ``target``: ``number:m`` (the tokens
    of the question's m-th number, 1-based, as ``number_tokens[i][m - 1]`` lists them, counted from each
    question's first token) or ``other`` (every other question token). ``thought`` 0 = BOT."""
    queries = positions.resolve(_thought_names(positions.n_latents))  # [batch, n + 1]
    frames = []
    for layer in _pattern_layers(cache):
        pattern = cache[act_name("pattern", layer)].float().cpu()
        for i, problem_id in enumerate(problem_ids):
            start = positions.n_pad[i]
            rows = pattern[i][:, queries[i]]  # [head, n + 1, key]
            question = rows[:, :, start : positions.bot]
            masses, names = [], []
            for m, tokens in enumerate(number_tokens[i], start=1):
                masses.append(question[:, :, tokens].sum(-1))
                names.append(f"number:{m}")
            masses.append(question.sum(-1) - sum(masses, torch.zeros_like(question[:, :, 0])))
            names.append("other")
            weights = torch.stack(masses, dim=-1)  # [head, n + 1, targets]
            frame = _long_frame(weights, ["head", "thought", "target"], problem_id=problem_id, layer=layer)
            frame["target"] = np.asarray(names, dtype=object)[frame["target"].to_numpy()]
            frames.append(frame)
    return pd.concat(frames, ignore_index=True)
