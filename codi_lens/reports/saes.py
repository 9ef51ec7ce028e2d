"""Reports of SAEs on the thoughts: the trained suite, the feature browser, feature pathways."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
from sae_lens import SAE

from codi_lens.data.problems import Problem
from codi_lens.feature_screen import Screen
from codi_lens.features import FeatureSurvey, position_profile, top_examples
from codi_lens.pathways import VALIDATION_RULE, PathwayStudy
from codi_lens.plotting import (
    feature_dashboard,
    pathway_effects,
    pathway_scatter,
    sae_quality_bars,
    sae_splice_bars,
    screen_counts,
    screen_volcano,
    write_html,
)
from codi_lens.reports.summaries import with_ci
from codi_lens.saes.ids import feature_id
from codi_lens.saes.io import sae_site
from codi_lens.stats import mean_ci_table


def splice_table(splice: pd.DataFrame, results: pd.DataFrame) -> pd.DataFrame:
    """Accuracy with 95% CIs per SAE and splice condition (the plain run included once per SAE)."""
    plain = splice[splice["condition"] == "spliced"].assign(condition="plain", correct=lambda f: f["baseline_correct"])
    both = pd.concat([plain, splice], ignore_index=True).astype({"correct": float})
    table = mean_ci_table(both, ["sae_id", "condition"], "correct").rename(columns={"mean": "accuracy"})
    kl = both.groupby(["sae_id", "condition"])["kl"].mean().rename("kl_mean").reset_index()
    table = table.merge(kl, on=["sae_id", "condition"])
    return table.merge(results[["sae_id", "site", "architecture"]], on="sae_id")


def write_sae_suite(results: pd.DataFrame, splice: pd.DataFrame, out: str | Path) -> dict[str, Any]:
    """``splice.parquet`` and the figures ``sae_quality.html`` and ``sae_splice.html`` of a trained suite
    (:func:`codi_lens.saes.suite.train_sae_suite`). Returns the summary's numbers."""
    out = Path(out)
    splice.to_parquet(out / "splice.parquet", index=False)
    write_html(sae_quality_bars(results), out / "sae_quality.html")
    write_html(sae_splice_bars(splice_table(splice, results)), out / "sae_splice.html")
    return {
        "n_saes": len(results),
        "explained_variance": {r.sae_id: with_ci(r, "explained_variance") for r in results.itertuples()},
        "l0": {r.sae_id: round(r.l0, 2) for r in results.itertuples()},
        "dead_fraction": {r.sae_id: round(r.dead_fraction, 4) for r in results.itertuples()},
        "min_explained_variance": round(float(results["explained_variance"].min()), 4),
    }


def write_feature_browser(
    saes: dict[str, SAE],
    survey: FeatureSurvey,
    problems: list[Problem],
    out: str | Path,
    *,
    top_features: int = 20,
    top_k: int = 10,
    n_latents: int = 6,
) -> None:
    """Per SAE, ``dashboard_<sae id>.html`` (an offline browser of its ``top_features`` most frequent features:
    frequency, position profile across thoughts, the ``top_k`` problems it is most active on), and the
    tables ``position_profile.parquet`` and ``top_examples.parquet``."""
    out = Path(out)
    profiles, examples = [], []
    for sae_id, sae in saes.items():
        site = sae_site(sae)
        frequency = survey.table[survey.table["sae_id"] == sae_id]
        chosen = frequency.sort_values("frequency", ascending=False).head(top_features)["feature"].tolist()
        profile = position_profile(sae, survey.dataset, [s.thought for s in site.across_thoughts(n_latents)])
        top = top_examples(survey.acts[sae_id], problems, chosen, k=top_k, site=site)
        profiles.append(profile.assign(sae_id=sae_id, feature_id=[feature_id(site, f) for f in profile["feature"]]))
        examples.append(top.assign(sae_id=sae_id))
        title = f"{sae_id}: {sae.cfg.d_sae} features on {len(problems)} held-out problems"
        write_html(feature_dashboard(frequency, profile, top, chosen, title), out / f"dashboard_{sae_id}.html")
    pd.concat(profiles, ignore_index=True).to_parquet(out / "position_profile.parquet", index=False)
    pd.concat(examples, ignore_index=True).to_parquet(out / "top_examples.parquet", index=False)


def features_summary(survey: FeatureSurvey, tokens: pd.DataFrame) -> dict[str, Any]:
    """How many features each SAE has active, and per feature intervention how many answers changed, how
    many tokens it shifts significantly, and the change in the log-probability of the whole answer number
    (nats, with its 95% bootstrap CI over problems)."""
    interventions = {}
    if len(tokens):
        per_feature = tokens.groupby(["sae_id", "feature"], as_index=False).agg(
            answers_changed=("answers_changed", "first"),
            significant=("significant", "sum"),
            logprob_change=("logprob_change", "first"),
            low=("logprob_change_low", "first"),
            high=("logprob_change_high", "first"),
        )
        interventions = {
            f"{r.sae_id}/{r.feature}": {
                "answers_changed": int(r.answers_changed),
                "significant_tokens": int(r.significant),
                "logprob_change": float(r.logprob_change),
                "logprob_change_ci95": [float(r.low), float(r.high)],
            }
            for r in per_feature.itertuples()
        }
    return {
        "features_active": {i: int((g["frequency"] > 0).sum()) for i, g in survey.table.groupby("sae_id")},
        "interventions": interventions,
    }


def write_pathways(joined: pd.DataFrame, agreement: dict[str, Any], out: str | Path) -> dict[str, Any]:
    """``pathways.html`` (predicted against replayed change) and the summary's agreement numbers."""
    write_html(pathway_scatter(joined, agreement), Path(out) / "pathways.html")
    return {
        "target_feature": agreement["target_feature"],
        "pearson": agreement["pearson"],
        "pearson_ci95": [agreement["low"], agreement["high"]],
        "n_pairs": agreement["n_pairs"],
    }


def screen_counts_table(screen: Screen) -> pd.DataFrame:
    """Per site: ``live`` (active on a screened problem), ``screened``, ``causal`` (selected), and per edit the
    features whose edit passed (``passing_<op>``)."""
    features = screen.features.groupby("site").agg(live=("live", "sum"), screened=("screened", "sum"))
    causal = screen.causal.groupby("site").size().rename("causal")
    table = features.join(causal).fillna({"causal": 0})
    if len(screen.summary):
        passing = screen.summary.pivot_table(index="site", columns="op", values="significant", aggfunc="sum")
        table = table.join(passing.add_prefix("passing_")).fillna(0)
    return table.astype(int).reset_index()


def write_screen(screen: Screen, out: str | Path) -> dict[str, Any]:
    """``summary.parquet``, ``causal.parquet``, ``features.parquet``, ``counts.parquet`` and ``screen.html`` (the
    volcano plot and the counts per site) of a causal screen; returns the summary's numbers."""
    out = Path(out)
    counts = screen_counts_table(screen)
    screen.summary.to_parquet(out / "summary.parquet", index=False)
    screen.causal.to_parquet(out / "causal.parquet", index=False)
    screen.features.to_parquet(out / "features.parquet", index=False)
    counts.to_parquet(out / "counts.parquet", index=False)
    if len(screen.summary):
        write_html(screen_volcano(screen.summary), out / "screen.html")
        write_html(screen_counts(counts), out / "screen_counts.html")
    strongest = screen.summary.sort_values("p_value").head(10) if len(screen.summary) else screen.summary
    return {
        "n_cells": len(screen.summary),
        "n_causal": len(screen.causal),
        "per_site": {r["site"]: {k: int(v) for k, v in r.items() if k != "site"} for r in counts.to_dict("records")},
        "strongest": [
            {
                "feature_id": r.feature_id,
                "op": r.op,
                "effect": round(float(r.effect), 4),
                "ci95": [round(float(r.low), 4), round(float(r.high), 4)],
                "cohens_d": round(float(r.cohens_d), 3),
                "q_value": float(r.q_value),
            }
            for r in strongest.itertuples()
        ],
    }


def screen_lines(summary: dict[str, Any]) -> list[str]:
    """What the screen found, in sentences computed from its numbers."""
    lines = []
    for site, counts in summary["per_site"].items():
        passing = ", ".join(f"{k.removeprefix('passing_')} {v}" for k, v in counts.items() if k.startswith("passing_"))
        lines.append(
            f"{site}: {counts['causal']} causal of {counts['screened']} screened ({counts['live']} live; passing by "
            f"edit: {passing or 'none tested'})"
        )
    if summary["n_causal"] == 0:
        lines.append(
            "no feature passes the screen (an edit with BH q < alpha and a mean effect of at least min-effect)"
        )
    return lines


def write_pathway_study(study: PathwayStudy, out: str | Path) -> dict[str, Any]:
    """``pathways.parquet``, ``agreement.parquet``, ``candidates.parquet`` and ``pathways.html`` of a study of many
    targets (:func:`codi_lens.pathways.study_pathways`); returns the summary's numbers."""
    out = Path(out)
    study.pathways.to_parquet(out / "pathways.parquet", index=False)
    study.agreement.to_parquet(out / "agreement.parquet", index=False)
    if len(study.pathways):
        write_html(pathway_effects(study.pathways), out / "pathways.html")
    pooled = study.agreement[study.agreement["target_id"] == "pooled"] if len(study.agreement) else study.agreement
    validated = study.pathways[study.pathways["validated"]] if len(study.pathways) else study.pathways
    return {
        "n_targets": int(study.candidates["target_id"].nunique()) if len(study.candidates) else 0,
        "n_pathways": len(study.pathways),
        "n_validated": len(validated),
        "validation_rule": VALIDATION_RULE,
        "pooled_pearson": None if pooled.empty else round(float(pooled.iloc[0]["pearson"]), 4),
        "pooled_pearson_ci95": None
        if pooled.empty
        else [round(float(pooled.iloc[0]["low"]), 4), round(float(pooled.iloc[0]["high"]), 4)],
        "validated": [
            {
                "target_id": r.target_id,
                "source_id": r.source_id,
                "predicted": round(r.predicted, 4),
                "replayed": round(r.replayed, 4),
                "ci95": [round(r.low, 4), round(r.high, 4)],
            }
            for r in validated.itertuples()
        ],
    }
