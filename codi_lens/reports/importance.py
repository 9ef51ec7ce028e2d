"""Reports of step importance and of attention against importance: tables, figures and the summary."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from codi_lens.attention import correlation_by_layer, per_thought
from codi_lens.importance import importance_table, set_interactions
from codi_lens.interventions.registry import SCOPES
from codi_lens.plotting import (
    attention_by_head,
    attention_by_layer,
    attention_vs_importance,
    importance_by_difficulty,
    importance_by_thought,
    pair_interaction_heatmap,
    problems_by_thought_heatmap,
    step_attention_heatmaps,
    write_html,
)
from codi_lens.reports.summaries import ci_triplet, with_ci
from codi_lens.stats import benjamini_hochberg, mean_ci_table, paired_contrast, sign_flip_pvalue


def write_step_importance(rows: pd.DataFrame, out: str | Path, intervention: str, scope: str) -> dict[str, Any]:
    """From step-importance rows (:func:`codi_lens.importance.step_importance`): ``importance.parquet`` (every
    condition with 95% CIs over problems), ``importance_by_difficulty.parquet`` and the figures
    ``importance.html``, ``kl.html``, ``heatmap.html`` (per problem and thought) and ``difficulty.html`` for
    ``intervention`` at ``scope``. Returns the summary's numbers."""
    out = Path(out)
    is_set = rows["scope"].map(lambda s: SCOPES[s].set_size > 0)
    table = importance_table(rows, by=("intervention", "scope", "thought", "thoughts"))
    table.to_parquet(out / "importance.parquet", index=False)
    sets_summary = write_set_interactions(rows, out) if is_set.any() else None
    rows, table = rows[~is_set], table[~table["scope"].map(lambda s: SCOPES[s].set_size > 0)]
    if rows.empty:
        return {"n_problems": int(sets_summary["n_problems"]), "set_interactions": sets_summary}
    chosen = rows[(rows["intervention"] == intervention) & (rows["scope"] == scope)]
    by_difficulty = importance_table(chosen, by=("difficulty", "thought"))
    by_difficulty.to_parquet(out / "importance_by_difficulty.parquet", index=False)
    write_html(importance_by_thought(table, "importance"), out / "importance.html")
    write_html(importance_by_thought(table, "kl"), out / "kl.html")
    write_html(
        problems_by_thought_heatmap(chosen, title=f"KL(baseline || {intervention}) per problem and thought ({scope})"),
        out / "heatmap.html",
    )
    write_html(importance_by_difficulty(by_difficulty), out / "difficulty.html")
    headline = table[(table["intervention"] == intervention) & (table["scope"] == scope)]
    baselines = rows.drop_duplicates("problem_id")
    return {
        "n_problems": int(rows["problem_id"].nunique()),
        "n_rows": len(rows),
        **({"set_interactions": sets_summary} if sets_summary else {}),
        "early_vs_late": early_versus_late(rows),
        "baseline_accuracy": float(baselines["baseline_correct"].mean()),
        "problems_without_answer_number": int(baselines["kl"].isna().sum()),
        f"{intervention}_{scope}": {
            int(r.thought): {"importance": with_ci(r, "importance"), "kl": with_ci(r, "kl")}
            for r in headline.itertuples()
        },
    }


def early_versus_late(rows: pd.DataFrame) -> dict[str, Any]:
    """Per intervention (scope ``single``), the early thoughts' importance against the late ones' on the same
    problems (first half 1..n/2 against second half): each problem's mean over its early and over its late
    thoughts of the break indicator and of KL, and their paired contrast (:func:`~codi_lens.stats.paired_contrast`:
    early minus late, bootstrap CI over problems, Cohen's d_z, Wilcoxon and sign tests), Wilcoxon p-values
    Benjamini-Hochberg corrected across interventions and metrics."""
    single = rows[rows["scope"] == "single"].assign(
        broken=lambda f: (f["baseline_correct"] & ~f["correct"]).astype(float)
    )
    if single.empty:
        return {}
    n = int(single["thought"].max())
    half = n // 2
    if half < 1:
        return {}
    out: dict[str, Any] = {}
    columns = pd.MultiIndex.from_product([["broken", "kl"], [False, True]])
    for intervention, group in single.groupby("intervention", sort=True):
        late = group.assign(late=group["thought"] > half)
        # groupby keeps all-NaN means (a random model's answers have no number, so no KL): the contrast is NaN
        per_problem = late.groupby(["problem_id", "late"])[["broken", "kl"]].mean().unstack("late")
        per_problem = per_problem.reindex(columns=columns)
        for metric in ("broken", "kl"):
            contrast = paired_contrast(per_problem[(metric, False)].to_numpy(), per_problem[(metric, True)].to_numpy())
            out[f"{intervention}/{metric}"] = {
                "early_thoughts": f"1-{half}",
                "late_thoughts": f"{half + 1}-{n}",
                **{
                    k: round(v, 4) if k in ("mean_difference", "low", "high", "cohens_d") else v
                    for k, v in contrast.items()
                },
            }
    _, q = benjamini_hochberg(np.array([entry["wilcoxon_p"] for entry in out.values()], dtype=float))
    for entry, value in zip(out.values(), q):
        entry["wilcoxon_q"] = float(value)
    return out


def interaction_table(interactions: pd.DataFrame) -> pd.DataFrame:
    """Per (intervention, scope, set of thoughts): the mean log-probability interaction with its 95% bootstrap CI
    over problems, a sign-flip permutation p-value and the Benjamini-Hochberg ``q`` and ``significant`` across
    sets, and the share of problems the set breaks only together."""
    by = ["intervention", "scope", "thoughts"]
    table = mean_ci_table(interactions, by, "logprob_interaction")
    grouped = interactions.groupby(by, sort=True)
    table["p"] = [sign_flip_pvalue(g["logprob_interaction"].to_numpy()) for _, g in grouped]
    table["significant"], table["q"] = benjamini_hochberg(table["p"].to_numpy())
    table["breaks_only_together"] = grouped["breaks_only_together"].mean().to_numpy()
    return table


def write_set_interactions(rows: pd.DataFrame, out: Path) -> dict[str, Any]:
    """``set_interactions.parquet`` (per problem and set), ``set_interactions_table.parquet``
    (:func:`interaction_table`), one ``pairs_<intervention>.html`` per intervention with pairs, and the summary's
    numbers: per set, the mean interaction with its CI and q, and the share broken only together."""
    interactions = set_interactions(rows)
    interactions.to_parquet(out / "set_interactions.parquet", index=False)
    table = interaction_table(interactions)
    table.to_parquet(out / "set_interactions_table.parquet", index=False)
    n_latents = int(rows["thought"].max())
    for intervention, part in table[table["scope"] == "pairs"].groupby("intervention"):
        write_html(pair_interaction_heatmap(part, n_latents), out / f"pairs_{intervention}.html")
    return {
        "n_problems": int(interactions["problem_id"].nunique()),
        "note": "logprob_interaction = set's change in log p(answer number) minus the sum of its members' (nats)",
        **{
            f"{r.intervention}/{r.scope}/{r.thoughts}": {
                "logprob_interaction": ci_triplet(r.mean, r.low, r.high),
                "bh_q": float(r.q),
                "breaks_only_together": round(float(r.breaks_only_together), 4),
            }
            for r in table.itertuples()
        },
    }


def _correlation(row: Any) -> dict[str, Any]:
    return {
        "pearson": with_ci(row, "pearson", 3),
        "spearman": with_ci(row, "spearman", 3),
        "spearman_permutation_p": float(row.p_permutation),
        "bh_q": float(row.q),
        "n_problems": int(row.n_problems),
    }


def write_ablation_attention(
    rows: pd.DataFrame, out: str | Path, *, seed: int = 0
) -> tuple[dict[str, Any], pd.DataFrame]:
    """From attention-and-importance rows (:func:`codi_lens.importance.attention_importance`):
    ``correlations.parquet`` (per layer, attention to thought k against the KL of zeroing it, and the control
    pairing each problem's attention with the next problem's importance), ``correlations_within_thought.parquet``
    (per layer and thought, across problems: the thoughts' average profile cannot drive it) and the figures
    ``attention.html``, ``attention_heads.html`` and ``attention_vs_importance.html``. Returns the summary's
    numbers and the per-layer correlations."""
    out = Path(out)
    frame = per_thought(rows)
    correlations = correlation_by_layer(frame, "attention", "kl", seed=seed)
    control = correlation_by_layer(frame, "attention", "kl_other", seed=seed)
    both = pd.concat([correlations.assign(pairing="same problem"), control.assign(pairing="control: next problem")])
    both.to_parquet(out / "correlations.parquet", index=False)
    within = correlation_by_layer(frame, "attention", "kl", by=["layer", "thought"], seed=seed)
    within.to_parquet(out / "correlations_within_thought.parquet", index=False)
    long = rows.melt(
        id_vars=["problem_id", "layer", "head", "thought"],
        value_vars=["attention_eot", "attention_answer"],
        var_name="source",
        value_name="weight",
    )
    long["source"] = long["source"].str.replace("attention_", "")
    write_html(attention_by_layer(long.dropna(subset=["weight"])), out / "attention.html")
    write_html(attention_by_head(long.dropna(subset=["weight"])), out / "attention_heads.html")
    write_html(attention_vs_importance(frame, correlations), out / "attention_vs_importance.html")
    summary = {
        "n_problems": int(rows["problem_id"].nunique()),
        "n_rows": len(rows),
        "correlation_by_layer": {int(r.layer): _correlation(r) for r in correlations.itertuples()},
        "control_next_problem": {int(r.layer): _correlation(r) for r in control.itertuples()},
        "within_thought": {f"{int(r.layer)}/{int(r.thought)}": _correlation(r) for r in within.itertuples()},
    }
    return summary, correlations


def write_attention_maps(among: pd.DataFrame, reads: pd.DataFrame, out: str | Path, n_latents: int) -> dict[str, Any]:
    """From :func:`codi_lens.importance.attention_maps`: ``thought_to_thought.parquet`` and
    ``question_to_thought.parquet`` (mean over heads and problems with 95% CIs over problems), the figures
    ``thought_to_thought.html`` (BOT and thoughts as queries and keys, per layer) and ``question_to_thought.html``
    (which of the question's numbers each latent step reads, per layer), and the summary's numbers: per layer
    and step, the question number it reads most, with its mass and CI."""
    out = Path(out)
    steps = ["bot", *[f"thought:{k}" for k in range(1, n_latents + 1)]]
    among = among.assign(
        query=among["query_thought"].map(steps.__getitem__), key=among["key_thought"].map(steps.__getitem__)
    )
    t2t = mean_ci_table(among, ["layer", "query", "key"], "weight")
    t2t.to_parquet(out / "thought_to_thought.parquet", index=False)
    write_html(
        step_attention_heatmaps(
            t2t, "key", "query", steps, steps,
            "Attention among BOT and the thoughts (rows: query, columns: key)<br>"
            "mean over heads and problems; hover: n, 95% CI",
            "key",
        ),
        out / "thought_to_thought.html",
    )  # fmt: skip
    reads = reads.assign(step=reads["thought"].map(steps.__getitem__))
    q2t = mean_ci_table(reads, ["layer", "step", "target"], "weight")
    q2t.to_parquet(out / "question_to_thought.parquet", index=False)
    common = q2t[q2t["n"] >= 0.5 * q2t["n"].max()]  # numbers most questions have (the table keeps every one)
    targets = sorted(set(common["target"]) - {"other"}, key=lambda t: int(t.split(":")[1])) + ["other"]
    write_html(
        step_attention_heatmaps(
            common, "target", "step", targets, steps,
            "What each latent step reads in the question: attention mass on each number's tokens (number:m = the "
            "m-th number written)<br>and on the other question tokens (mean over heads and problems; hover: n, 95% CI)",
            "question tokens",
        ),
        out / "question_to_thought.html",
    )  # fmt: skip
    # Only numbers most questions have: a 7th number written in one question would win with n = 1.
    numbers = q2t[(q2t["target"] != "other") & (q2t["n"] >= 0.5 * q2t["n"].max())]
    best = numbers.loc[numbers.groupby(["layer", "step"])["mean"].idxmax()]
    return {
        "note": "reads_most: among the question numbers at least half the problems have",
        "reads_most": {
            f"layer {int(r.layer)} {r.step}": {"number": r.target, "mass": ci_triplet(r.mean, r.low, r.high)}
            for r in best.itertuples()
        },
    }
