"""One row per feature: what the causal screen, the pathway study, the token association and the activation data
say about it, joined on the feature id (``site/feature``), and what the features encode.

- :func:`value_encoding`: does a feature of thought k encode the chain's value after step k? Per feature, the
  Spearman correlation of its activation with each step's intermediate value over the problems that have that
  step; ``rho_own`` (the feature's own thought's step) with its p-value and BH q-value across features, and the
  step it correlates with most (``best_step``). The other steps are the control: a feature that tracks the
  problem's size correlates with every step alike.
- :func:`feature_table`: the join, one row per screened feature.
- :func:`encoding_contrast`: the share of causal features that encode their own step against the share of the
  screened features that did not pass, with bootstrap CIs over features; :func:`own_step_shares`: the share
  whose strongest step is their own, against the same with activations moved to other problems
  (:func:`shuffled_problems`, the control).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import scipy.stats

from codi_lens.data.problems import Problem
from codi_lens.saes.ids import parse_feature_id
from codi_lens.stats import benjamini_hochberg, bootstrap_ci


def value_encoding(activations: pd.DataFrame, problems: Sequence[Problem], *, alpha: float = 0.05) -> pd.DataFrame:
    """Per feature of ``activations`` (``feature_id, problem_id, activation``, one row per feature and problem):
    ``thought`` (its site's), for every step s the Spearman correlation ``rho_step_s`` of the activation with the
    step's intermediate value (problems without step s left out; NaN when either side is constant), ``rho_own``
    and ``p_own`` at s = thought (the value after the feature's own step), ``q_own`` / ``encodes_own``
    (Benjamini-Hochberg across features at ``alpha``), and ``best_step`` (the step of the largest |rho|)."""
    values = {p.id: p.intermediates for p in problems}
    n_steps = max((len(v) for v in values.values()), default=0)
    rows = []
    for fid, group in activations.groupby("feature_id", sort=True):
        thought = parse_feature_id(fid)[0].thought
        row = {"feature_id": fid, "thought": thought}
        best, best_rho = None, 0.0
        for step in range(1, n_steps + 1):
            pairs = [
                (a, values[i][step - 1])
                for i, a in zip(group["problem_id"], group["activation"])
                if len(values[i]) >= step
            ]
            rho, p = _spearman(pairs)
            row[f"rho_step_{step}"] = rho
            if step == thought:
                row["rho_own"], row["p_own"] = rho, p
            if np.isfinite(rho) and abs(rho) > abs(best_rho):
                best, best_rho = step, rho
        row.setdefault("rho_own", float("nan"))
        row.setdefault("p_own", float("nan"))
        row["best_step"] = best
        rows.append(row)
    table = pd.DataFrame(rows)
    if len(table):
        table["encodes_own"], table["q_own"] = benjamini_hochberg(table["p_own"].to_numpy(), alpha)
    return table


def _spearman(pairs: list[tuple[float, float]]) -> tuple[float, float]:
    if len(pairs) < 3:
        return float("nan"), float("nan")
    a, v = np.array(pairs, dtype=np.float64).T
    if np.all(a == a[0]) or np.all(v == v[0]):
        return float("nan"), float("nan")
    result = scipy.stats.spearmanr(a, v)
    return float(result.statistic), float(result.pvalue)


def _tokens_moved(tokens: pd.DataFrame, up: bool, k: int = 3) -> pd.Series:
    """Per feature, its ``k`` flagged tokens with the largest (or most negative) log-odds, as ``tok(+2.1)``."""
    flagged = tokens[tokens["flagged"].astype(bool) & ((tokens["log_odds"] > 0) == up)]
    ranked = flagged.sort_values("log_odds", ascending=not up)
    moved = {
        fid: ", ".join(f"{t}({x:+.2f})" for t, x in zip(group["token"][:k], group["log_odds"][:k]))
        for fid, group in ranked.groupby("feature_id", sort=False)
    }
    return pd.Series(moved, dtype=object)


def feature_table(
    summary: pd.DataFrame,
    causal: pd.DataFrame,
    *,
    encoding: pd.DataFrame | None = None,
    pathways: pd.DataFrame | None = None,
    tokens: pd.DataFrame | None = None,
    examples: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """One row per screened feature (``summary``: the screen's per (feature, op) table; ``causal``: its selection),
    joined on ``feature_id``: ``site, feature, frequency``, per edit its ``effect_*``, ``low_*``, ``high_*``,
    ``d_*``, ``q_*``; ``causal``, ``rank``, ``best_op``; from ``encoding`` (:func:`value_encoding`) ``rho_own,
    q_own, encodes_own, best_step``; from ``pathways`` (a study's per-pathway table) ``upstream_validated``
    (validated pathways into it), ``upstream_sources`` (their source ids) and ``downstream_validated``; from
    ``tokens`` (the token association) ``answers_changed``, ``tokens_flagged``, ``tokens_up`` and ``tokens_down``;
    from ``examples`` (top-activating problems) ``top_problems`` and ``top_intermediates``."""
    wide = summary.pivot_table(
        index=["feature_id", "site", "feature"],
        columns="op",
        values=["effect", "low", "high", "cohens_d", "q_value"],
        aggfunc="first",
    )
    wide.columns = [
        f"{'d' if name == 'cohens_d' else 'q' if name == 'q_value' else name}_{op}" for name, op in wide.columns
    ]
    table = wide.reset_index()
    table = table.merge(summary.groupby("feature_id")["frequency"].first().reset_index(), on="feature_id")
    table = table.merge(causal[["feature_id", "best_op", "rank"]], on="feature_id", how="left")
    table["causal"] = table["rank"].notna()
    if encoding is not None and len(encoding):
        table = table.merge(
            encoding[["feature_id", "rho_own", "q_own", "encodes_own", "best_step"]], on="feature_id", how="left"
        )
    if pathways is not None and len(pathways):
        valid = pathways[pathways["validated"]]
        upstream = valid.groupby("target_id").agg(
            upstream_validated=("source_id", "size"), upstream_sources=("source_id", lambda s: ", ".join(sorted(s)))
        )
        downstream = valid.groupby("source_id").size().rename("downstream_validated")
        table = table.merge(upstream, left_on="feature_id", right_index=True, how="left")
        table = table.merge(downstream, left_on="feature_id", right_index=True, how="left")
        table[["upstream_validated", "downstream_validated"]] = (
            table[["upstream_validated", "downstream_validated"]].fillna(0).astype(int)
        )
    if tokens is not None and len(tokens):
        per_feature = tokens.groupby("feature_id").agg(
            answers_changed=("answers_changed", "first"), tokens_flagged=("flagged", "sum")
        )
        per_feature["tokens_up"] = _tokens_moved(tokens, up=True)
        per_feature["tokens_down"] = _tokens_moved(tokens, up=False)
        table = table.merge(per_feature, left_on="feature_id", right_index=True, how="left")
    if examples is not None and len(examples):
        top = examples.sort_values(["feature_id", "rank"]).groupby("feature_id").head(3).groupby("feature_id")
        joined = pd.DataFrame(
            {
                "top_problems": top["problem_id"].agg(", ".join),
                "top_intermediates": top["intermediates"].agg(" | ".join),
            }
        )
        table = table.merge(joined, left_on="feature_id", right_index=True, how="left")
    return table.sort_values(["causal", "site", "rank", "feature"], ascending=[False, True, True, True]).reset_index(
        drop=True
    )


def encoding_contrast(table: pd.DataFrame, *, seed: int = 0) -> dict[str, dict[str, float]]:
    """The share of features that encode their own step's value (``encodes_own``), among the causal features and
    among the screened features that did not pass, each with a 95% bootstrap CI over features, and ``n``."""
    out = {}
    for name, group in (("causal", table[table["causal"]]), ("not_causal", table[~table["causal"]])):
        values = group["encodes_own"].astype(float).to_numpy() if "encodes_own" in group else np.array([])
        share, low, high = bootstrap_ci(values, seed=seed)
        out[name] = {"share": share, "low": low, "high": high, "n": int(len(values))}
    return out


def shuffled_problems(activations: pd.DataFrame, *, seed: int = 0) -> pd.DataFrame:
    """The control of :func:`value_encoding`: every feature's activations moved to other problems by one seeded
    permutation of the problems (the same for every feature), so activations keep their distribution and
    features their co-activation, but no longer belong to the values they are compared with."""
    ids = np.sort(activations["problem_id"].unique())
    permuted = dict(zip(ids, np.random.default_rng(seed).permutation(ids)))
    return activations.assign(problem_id=activations["problem_id"].map(permuted))


def own_step_shares(
    encoding: pd.DataFrame, shuffled: pd.DataFrame, causal: Sequence[str], *, seed: int = 0
) -> dict[str, dict[str, float]]:
    """The share of features whose strongest correlation is with their own step's value (``best_step`` equals
    their thought), among causal features, the other screened features, and every feature under the shuffled
    control; each with a 95% bootstrap CI over features and ``n``."""
    chosen = set(causal)
    groups = {
        "causal": encoding[encoding["feature_id"].isin(chosen)],
        "not_causal": encoding[~encoding["feature_id"].isin(chosen)],
        "shuffled": shuffled,
    }
    out = {}
    for name, group in groups.items():
        share, low, high = bootstrap_ci((group["best_step"] == group["thought"]).astype(float).to_numpy(), seed=seed)
        out[name] = {"share": share, "low": low, "high": high, "n": int(len(group))}
    return out
