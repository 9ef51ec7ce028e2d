"""Reports of patching sweeps and of chained versus parallel patching: tables, figures and the summary."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from codi_lens.patching.kinds import CHANGED, SPAN_STARTS
from codi_lens.plotting import patching_bars, patching_heatmap, trajectory_lines, write_html
from codi_lens.reports.summaries import with_ci
from codi_lens.run.outcome import skipped_by_reason
from codi_lens.stats import bootstrap_ci, mean_ci_table

#: Patch kinds whose sites are a layer x position grid (the others are one site per thought or head).
GRID_EXCLUDED = ("thought_input", "z")


def used_rows(rows: pd.DataFrame) -> pd.DataFrame:
    """The rows of pairs that were measured (no skip ``reason``)."""
    return rows[rows["reason"].fillna("") == ""]


def site_table(rows: pd.DataFrame) -> pd.DataFrame:
    """Mean recovery and KL with 95% bootstrap CIs over pairs, per site (``kind, hook, head, position, layer``)."""
    used = used_rows(rows)
    by = ["kind", "hook", "head", "position", "layer"]
    recovery = mean_ci_table(used, by, "recovery").rename(
        columns={"mean": "recovery", "low": "recovery_low", "high": "recovery_high"}
    )
    kl = mean_ci_table(used, by, "kl").rename(columns={"mean": "kl", "low": "kl_low", "high": "kl_high"})
    return recovery.merge(kl.drop(columns="n"), on=by)


def write_position_patching(
    rows: pd.DataFrame, out: str | Path, kinds: list[str], n_latents: int
) -> tuple[dict[str, Any], pd.DataFrame]:
    """From patching rows (:func:`codi_lens.patching.patch_sweep`): ``cells.parquet`` (mean and 95% CI per
    site), the figures ``heatmap.html`` (layer x position per kind, hover: n, mean, CI), ``layer_only.html``
    and ``position_only.html``. Returns the summary's numbers and the per-site table."""
    out = Path(out)
    used = used_rows(rows)
    sites = site_table(rows)
    sites.to_parquet(out / "cells.parquet", index=False)
    positions = [CHANGED, "question:-1", "bot", *[f"thought:{k}" for k in range(1, n_latents + 1)], "eot", *SPAN_STARTS]
    mapped = [kind for kind in kinds if kind not in GRID_EXCLUDED]
    for kind in mapped:
        write_html(
            patching_heatmap(
                used[used["kind"] == kind],
                positions,
                title=f"{kind}: mean recovery of the clean answer (hover: n pairs, 95% CI)",
            ),
            out / ("heatmap.html" if kind == mapped[0] else f"heatmap_{kind}.html"),
        )
    layer_only = used[used["position"].isin(list(SPAN_STARTS))]
    if len(layer_only):
        label = layer_only["layer"].astype(int).astype(str) + " " + layer_only["kind"] + " " + layer_only["position"]
        write_html(
            patching_bars(
                layer_only.assign(layer=label),
                "layer",
                title="Layer-only: every thought ('thoughts') or BOT and every thought ('latents') "
                "of one layer patched at once (95% CI)",
            ),
            out / "layer_only.html",
        )
    position_only = used[used["kind"] == "thought_input"]
    if len(position_only):
        write_html(
            patching_bars(position_only, "position", title="Position-only: the fed thought patched (95% CI)"),
            out / "position_only.html",
        )
    best = sites.sort_values("recovery", ascending=False).head(5)
    summary = {
        "n_pairs": int(rows["pair_id"].nunique()),
        "n_pairs_used": int(used["pair_id"].nunique()),
        "skipped_by_reason": skipped_by_reason(rows, "pair_id"),
        "top_cells": [
            {
                "hook": r.hook,
                "head": None if pd.isna(r.head) else int(r.head),
                "position": r.position,
                "n": int(r.n),
                "recovery": with_ci(r, "recovery"),
            }
            for r in best.itertuples()
        ],
    }
    return summary, sites


def report_lines(summary: dict[str, Any]) -> str:
    """What a patching sweep prints: pairs used, the top sites with CIs, and attribution's agreement."""
    lines = [f"{summary['n_pairs_used']} of {summary['n_pairs']} pairs used; top sites:"]
    for site in summary["top_cells"]:
        mean, low, high = site["recovery"]
        lines.append(f"  {site['hook']} {site['position']}: recovery {mean:.3f} [{low:.3f}, {high:.3f}]")
    agreement = summary.get("attribution_vs_exact")
    if agreement:
        lines.append(
            f"attribution against exact over {agreement['cells']} sites: Spearman {agreement['spearman']:.2f}, "
            f"top-{agreement['k']} overlap {agreement['top_k_overlap']:.2f}"
        )
    return "\n".join(lines)


def write_iterative_patching(rows: pd.DataFrame, out: str | Path) -> dict[str, Any]:
    """From chained-versus-parallel rows (:func:`codi_lens.patching.trajectory_sweep`): the figures
    ``trajectories.html`` and ``fed_trajectories.html``. Returns the summary's numbers: the final recovery per
    layer and start thought of each mode, and chained minus parallel, with 95% bootstrap CIs over pairs."""
    out = Path(out)
    used = used_rows(rows)
    write_html(trajectory_lines(used, "cos_clean"), out / "trajectories.html")
    write_html(
        trajectory_lines(used, "fed_cos_clean", title="Cosine of the fed thought to the clean run's (95% CI)"),
        out / "fed_trajectories.html",
    )
    final = used.drop_duplicates(["pair_id", "layer", "start_thought", "mode"])
    recovery = {}
    for (layer, start), group in final.groupby(["layer", "start_thought"]):
        wide = group.pivot(index="pair_id", columns="mode", values="recovery")
        entry = {
            mode: [round(x, 4) for x in bootstrap_ci(wide[mode].to_numpy(dtype=float))]
            for mode in ("chained", "parallel")
        }
        difference = (wide["chained"] - wide["parallel"]).to_numpy(dtype=float)
        entry["chained_minus_parallel"] = [round(x, 4) for x in bootstrap_ci(difference)]
        recovery[f"layer {int(layer)} from thought {int(start)}"] = entry
    after_start = used[used["thought"] > used["start_thought"]]
    return {
        "n_pairs": int(rows["pair_id"].nunique()),
        "n_pairs_used": int(used["pair_id"].nunique()),
        "skipped_by_reason": skipped_by_reason(rows, "pair_id"),
        "final_recovery": recovery,
        "mean_cos_clean_after_start": {
            mode: float(np.round(after_start[after_start["mode"] == mode]["cos_clean"].mean(), 4))
            for mode in ("chained", "parallel")
        },
    }
