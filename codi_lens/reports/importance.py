"""Reports of step importance and of attention against importance: tables, figures and the summary."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from codi_lens.attention import correlation_by_layer, per_thought
from codi_lens.importance import importance_table
from codi_lens.plotting import (
    attention_by_head,
    attention_by_layer,
    attention_vs_importance,
    importance_by_difficulty,
    importance_by_thought,
    problems_by_thought_heatmap,
    write_html,
)
from codi_lens.reports.summaries import with_ci


def write_step_importance(rows: pd.DataFrame, out: str | Path, intervention: str, scope: str) -> dict[str, Any]:
    """From step-importance rows (:func:`codi_lens.importance.step_importance`): ``importance.parquet`` (every
    condition with 95% CIs over problems), ``importance_by_difficulty.parquet`` and the figures
    ``importance.html``, ``kl.html``, ``heatmap.html`` (per problem and thought) and ``difficulty.html`` for
    ``intervention`` at ``scope``. Returns the summary's numbers."""
    out = Path(out)
    table = importance_table(rows)
    table.to_parquet(out / "importance.parquet", index=False)
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
        "baseline_accuracy": float(baselines["baseline_correct"].mean()),
        "problems_without_answer_number": int(baselines["kl"].isna().sum()),
        f"{intervention}_{scope}": {
            int(r.thought): {"importance": with_ci(r, "importance"), "kl": with_ci(r, "kl")}
            for r in headline.itertuples()
        },
    }


def _correlation(row: Any) -> dict[str, Any]:
    return {
        "pearson": with_ci(row, "pearson", 3),
        "spearman": with_ci(row, "spearman", 3),
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
