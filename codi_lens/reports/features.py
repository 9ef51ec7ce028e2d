"""The feature report: one joined table per feature and one HTML page with the top causal features."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import plotly.express as px

from codi_lens.core.sites import Site
from codi_lens.feature_report import encoding_contrast
from codi_lens.feature_screen import Screen
from codi_lens.pathways import VALIDATION_RULE
from codi_lens.plotting import TEMPLATE, pathway_effects, screen_counts, screen_volcano, write_page
from codi_lens.reports.saes import screen_counts_table
from codi_lens.saes.ids import parse_feature_id

#: The columns of the page's table of top features (those present).
TOP_COLUMNS = [
    "feature_id",
    "best_op",
    "effect_ablate",
    "effect_clamp",
    "d_ablate",
    "d_clamp",
    "frequency",
    "rho_own",
    "best_step",
    "upstream_validated",
    "downstream_validated",
    "tokens_up",
    "tokens_down",
    "top_intermediates",
]


def pathway_counts(pathways: pd.DataFrame) -> pd.DataFrame:
    """Validated pathways and pathways tested, per (source thought, target thought)."""
    if pathways is None or pathways.empty:
        return pd.DataFrame(columns=["source_thought", "target_thought", "validated", "tested"])
    table = pathways.assign(
        source_thought=[parse_feature_id(i)[0].thought for i in pathways["source_id"]],
        target_thought=[parse_feature_id(i)[0].thought for i in pathways["target_id"]],
    )
    return (
        table.groupby(["source_thought", "target_thought"])
        .agg(validated=("validated", "sum"), tested=("validated", "size"))
        .reset_index()
    )


def feature_report_summary(
    table: pd.DataFrame,
    screen: Screen,
    pathways: pd.DataFrame | None,
    orphans: pd.DataFrame,
    own_steps: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The report's headline numbers, every one computed from the tables."""
    counts = screen_counts_table(screen)
    summary: dict[str, Any] = {
        "n_screened": int(screen.features["screened"].sum()),
        "n_causal": int(table["causal"].sum()),
        "causal_per_site": dict(zip(counts["site"], counts["causal"].astype(int))),
        "screened_per_site": dict(zip(counts["site"], counts["screened"].astype(int))),
        "orphan_ids": int(len(orphans)),
    }
    if "encodes_own" in table:
        summary["encodes_own_step"] = encoding_contrast(table)
        causal = table[table["causal"]]
        summary["causal_best_step_is_own"] = int((causal["best_step"] == causal["site"].map(_thought)).sum())
    if own_steps:
        summary["best_step_is_own"] = own_steps
    if pathways is not None and len(pathways):
        by_step = pathway_counts(pathways)
        adjacent = by_step[by_step["target_thought"] == by_step["source_thought"] + 1]
        summary["pathways"] = {
            "tested": int(by_step["tested"].sum()),
            "validated": int(by_step["validated"].sum()),
            "adjacent_tested": int(adjacent["tested"].sum()),
            "adjacent_validated": int(adjacent["validated"].sum()),
            "rule": VALIDATION_RULE,
        }
    return summary


def _share(group: dict[str, float]) -> str:
    return f"{group['share']:.0%} [{group['low']:.0%}, {group['high']:.0%}] (n={group['n']})"


def _thought(site: str) -> int | None:
    return Site.parse(site).thought


def feature_report_lines(summary: dict[str, Any]) -> list[str]:
    """The page's reading, in sentences built from the summary's numbers."""
    lines = [
        f"{summary['n_causal']} of {summary['n_screened']} screened features pass the causal screen; per site: "
        + ", ".join(
            f"{s} {summary['causal_per_site'][s]}/{summary['screened_per_site'][s]}" for s in summary["causal_per_site"]
        )
        + "."
    ]
    contrast = summary.get("encodes_own_step")
    if contrast:
        c, n = contrast["causal"], contrast["not_causal"]
        overlap = not (c["low"] > n["high"] or n["low"] > c["high"])
        lines.append(
            f"Encoding their own step's value (Spearman, BH q < 0.05): {_share(c)} of causal features against "
            f"{_share(n)} of the screened features that did not pass; the intervals "
            + ("overlap." if overlap else "do not overlap.")
        )
    own = summary.get("best_step_is_own")
    if own:
        c, n, s = own["causal"], own["not_causal"], own["shuffled"]
        beyond = "above" if min(c["low"], n["low"]) > s["high"] else "not clearly above"
        lines.append(
            f"Strongest correlation with their own step's value: {_share(c)} of causal and {_share(n)} of other "
            f"screened features, against {_share(s)} with activations moved to other problems ({beyond} the control)."
        )
    paths = summary.get("pathways")
    if paths:
        lines.append(
            f"{paths['validated']} of {paths['tested']} traced pathways validate; {paths['adjacent_validated']} of "
            f"{paths['adjacent_tested']} from thought j to thought j+1."
        )
    lines.append(
        "No orphan feature ids." if summary["orphan_ids"] == 0 else f"{summary['orphan_ids']} orphan feature ids."
    )
    return lines


def encoding_strip(table: pd.DataFrame) -> px.scatter:
    """Each screened feature's Spearman correlation with its own step's value, causal against not."""
    data = table.assign(group=table["causal"].map({True: "causal", False: "not causal"}))
    return px.strip(
        data,
        x="site",
        y="rho_own",
        color="group",
        hover_data=["feature_id", "best_step", "q_own"],
        template=TEMPLATE,
        title="Does a feature of thought k track the value after step k? (Spearman rho over problems)",
    )


def write_feature_report(
    table: pd.DataFrame,
    screen: Screen,
    pathways: pd.DataFrame | None,
    orphans: pd.DataFrame,
    out: str | Path,
    *,
    own_steps: dict[str, Any] | None = None,
    top: int = 20,
) -> dict[str, Any]:
    """``results.parquet``, ``audit.parquet`` and ``report.html`` (one offline page); returns the summary."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    table.to_parquet(out / "results.parquet", index=False)
    orphans.to_parquet(out / "audit.parquet", index=False)
    summary = feature_report_summary(table, screen, pathways, orphans, own_steps)
    causal = table[table["causal"]].copy()
    strength = causal[[c for c in ("d_ablate", "d_clamp") if c in causal]].abs().max(axis=1)
    top_table = causal.assign(strength=strength).sort_values("strength", ascending=False).head(top)
    sections: list[tuple[str, list]] = [("Reading", feature_report_lines(summary))]
    if len(screen.summary):
        sections.append(("Causal screen", [screen_volcano(screen.summary), screen_counts(screen_counts_table(screen))]))
    sections.append(
        (f"Top {len(top_table)} causal features (by |d|)", [top_table[[c for c in TOP_COLUMNS if c in top_table]]])
    )
    if "rho_own" in table:
        sections.append(("What the features encode", [encoding_strip(table)]))
    if pathways is not None and len(pathways):
        sections.append(
            ("Pathways", [f"Validated: {VALIDATION_RULE}.", pathway_effects(pathways), pathway_counts(pathways)])
        )
    sections.append(
        ("Feature id audit", [orphans if len(orphans) else "Every feature id resolves to a feature of the SAEs."])
    )
    write_page("Causal features of the thoughts", sections, out / "report.html")
    return summary
