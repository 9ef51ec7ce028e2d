"""Reports of patching sweeps and of chained versus parallel patching: tables, figures and the summary."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from codi_lens.patching.kinds import CHANGED, SPAN_STARTS
from codi_lens.patching.routes import EVERY_LAYER, interactions
from codi_lens.plotting import (
    patching_bars,
    patching_heatmap,
    route_bars,
    route_layer_heatmap,
    trajectory_lines,
    write_html,
)
from codi_lens.reports.summaries import ci_triplet, with_ci
from codi_lens.run.outcome import skipped_by_reason
from codi_lens.stats import benjamini_hochberg, bootstrap_ci, mean_ci_table, paired_contrast, sign_flip_pvalue

#: Patch kinds whose sites are a layer x position grid (the others are one site per thought or head).
GRID_EXCLUDED = ("thought_input", "z")


def used_rows(rows: pd.DataFrame) -> pd.DataFrame:
    """The rows of pairs that were measured (no skip ``reason``)."""
    return rows[rows["reason"].fillna("") == ""]


def site_table(rows: pd.DataFrame) -> pd.DataFrame:
    """Mean recovery and KL with 95% bootstrap CIs over pairs, per site (``kind, hook, head, position, layer``),
    with a sign-flip permutation p-value for the mean recovery and its Benjamini-Hochberg ``q`` and
    ``significant`` (5%) across the sites of each kind."""
    used = used_rows(rows)
    by = ["kind", "hook", "head", "position", "layer"]
    recovery = mean_ci_table(used, by, "recovery").rename(
        columns={"mean": "recovery", "low": "recovery_low", "high": "recovery_high"}
    )
    kl = mean_ci_table(used, by, "kl").rename(columns={"mean": "kl", "low": "kl_low", "high": "kl_high"})
    table = recovery.merge(kl.drop(columns="n"), on=by)
    grouped = used.groupby(by, dropna=False, sort=True)
    table["p"] = [sign_flip_pvalue(group["recovery"].to_numpy()) for _, group in grouped]
    table["q"], table["significant"] = np.nan, False
    for _, part in table.groupby("kind"):
        rejected, q = benjamini_hochberg(part["p"].to_numpy())
        table.loc[part.index, "q"], table.loc[part.index, "significant"] = q, rejected
    return table


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
                significant=sites[sites["kind"] == kind],
                title=f"{kind}: mean recovery of the clean answer (hover: n pairs, 95% CI; * = BH 5% across sites)",
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
    ``trajectories.html`` and ``fed_trajectories.html``, and ``final_recovery.parquet`` (per layer and start
    thought: the final recovery of each mode and their difference, with 95% CIs over pairs). Returns the summary's
    numbers: the final recovery per layer and start thought of each mode, and chained minus parallel, with 95%
    bootstrap CIs over pairs, Cohen's d_z and Wilcoxon and sign tests (the Wilcoxon p-values Benjamini-Hochberg
    corrected across cells)."""
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
        contrast = paired_contrast(wide["chained"].to_numpy(dtype=float), wide["parallel"].to_numpy(dtype=float))
        entry["chained_minus_parallel_test"] = {k: contrast[k] for k in ("n", "cohens_d", "wilcoxon_p", "sign_p")}
        recovery[f"layer {int(layer)} from thought {int(start)}"] = entry
    _, q = benjamini_hochberg([e["chained_minus_parallel_test"]["wilcoxon_p"] for e in recovery.values()])
    for entry, value in zip(recovery.values(), q):
        entry["chained_minus_parallel_test"]["wilcoxon_q"] = float(value)
    pd.DataFrame(
        [
            {"cell": cell, "mode": mode, "mean": values[0], "low": values[1], "high": values[2]}
            for cell, entry in recovery.items()
            for mode, values in entry.items()
            if mode in ("chained", "parallel", "chained_minus_parallel")
        ],
        columns=["cell", "mode", "mean", "low", "high"],
    ).to_parquet(out / "final_recovery.parquet", index=False)
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


#: The columns that name one route patch in a table of route rows.
ROUTE_CELL = ["donor", "target", "thought", "first_thought", "route", "layer", "head"]


def route_family(layer: float, head: float) -> str:
    """Which grid a route cell belongs to, for the multiple-testing correction: the routes over every layer,
    the attention route by layer, or by key/value head."""
    if not pd.isna(head):
        return "head"
    return "routes" if layer == EVERY_LAYER else "layer"


def route_cells(rows: pd.DataFrame) -> pd.DataFrame:
    """Per route patch: ``n`` pairs, mean recovery with its 95% bootstrap CI (``mean, low, high``), the mean KL,
    a sign-flip permutation p-value that the mean recovery is zero, and its Benjamini-Hochberg ``q`` and
    ``significant`` (at 5%) within its donor's grid (:func:`route_family`); with the control, each own-donor
    cell also gets ``control_mean`` (the same patch from another problem's run) and ``own_minus_control`` (the
    paired contrasts with CIs are :func:`route_controls`)."""
    used = used_rows(rows)
    table = mean_ci_table(used, ROUTE_CELL, "recovery")
    grouped = used.groupby(ROUTE_CELL, dropna=False, sort=True)
    table["kl"] = grouped["kl"].mean().to_numpy()
    table["p"] = [sign_flip_pvalue(group["recovery"].to_numpy()) for _, group in grouped]
    table["family"] = [route_family(r.layer, r.head) for r in table.itertuples()]
    table["q"], table["significant"] = np.nan, False
    for _, part in table.groupby(["donor", "family"]):
        rejected, q = benjamini_hochberg(part["p"].to_numpy())
        table.loc[part.index, "q"], table.loc[part.index, "significant"] = q, rejected
    # Beside each own-donor cell, the same patch from another problem's run: what the patch does without this
    # problem's values (breaking the corrupted answer alone moves the logit difference).
    cell = [c for c in ROUTE_CELL if c != "donor"]
    control = table[table["donor"] == "other"].set_index(cell, drop=False)["mean"]
    if len(control):
        own = table["donor"] == "clean"
        keys = pd.MultiIndex.from_frame(table.loc[own, cell])
        table.loc[own, "control_mean"] = control.reindex(keys).to_numpy()
        table["own_minus_control"] = table["mean"] - table.get("control_mean", np.nan)
    return table


def route_pairs(rows: pd.DataFrame) -> list[tuple[tuple[str, int], pd.DataFrame]]:
    """Per step ``(target, thought)`` patched through both routes (own clean run as donor, every layer): a table
    with one row per measured pair and the columns ``recurrence`` and ``attention`` (recovery by each)."""
    used = used_rows(rows)
    if used.empty:  # every pair skipped: the rows hold only the pairs and their reasons
        return []
    whole = used[(used["donor"] == "clean") & (used["layer"] == EVERY_LAYER) & used["head"].isna()]
    steps = []
    for key, group in whole.groupby(["target", "thought"], sort=False):
        wide = group.pivot(index="pair_id", columns="route", values="recovery")
        if {"recurrence", "attention"} <= set(wide.columns):
            steps.append((key, wide))
    return steps


def route_contrasts(rows: pd.DataFrame) -> pd.DataFrame:
    """Per step with both routes (own clean run as donor): recurrence minus attention recovery on the same pairs
    (:func:`~codi_lens.stats.paired_contrast`: mean difference, 95% CI, Cohen's d_z, Wilcoxon and sign tests),
    the Wilcoxon p-values corrected across steps (Benjamini-Hochberg ``q``)."""
    out = []
    for (target, thought), wide in route_pairs(rows):
        contrast = paired_contrast(wide["recurrence"].to_numpy(), wide["attention"].to_numpy())
        out.append({"target": target, "thought": thought, **contrast})
    table = pd.DataFrame(out)
    if len(table):
        table["significant"], table["q"] = benjamini_hochberg(table["wilcoxon_p"].to_numpy())
    return table


def route_controls(rows: pd.DataFrame) -> pd.DataFrame:
    """Per step and route (every layer): the pair's own clean run minus the other-problem control on the same
    pairs (:func:`~codi_lens.stats.paired_contrast`), Wilcoxon p-values corrected across steps and routes
    (Benjamini-Hochberg ``q``). Empty without the control."""
    used = used_rows(rows)
    whole = used[(used["layer"] == EVERY_LAYER) & used["head"].isna()]
    if set(whole["donor"]) != {"clean", "other"}:
        return pd.DataFrame()
    wide = whole.pivot_table(index=["target", "route", "pair_id"], columns="donor", values="recovery").dropna()
    out = []
    for (target, route), group in wide.groupby(level=["target", "route"], sort=False):
        contrast = paired_contrast(group["clean"].to_numpy(), group["other"].to_numpy())
        out.append({"target": target, "route": route, **contrast})
    table = pd.DataFrame(out)
    table["significant"], table["q"] = benjamini_hochberg(table["wilcoxon_p"].to_numpy())
    return table


def carried_by(contrast: pd.Series) -> str:
    """The route a step's content is carried by, read from its paired contrast: the route with the larger
    recovery when the difference survives the correction, else that the two cannot be told apart."""
    if not contrast["significant"]:
        return "not distinguishable"
    return "recurrence" if contrast["mean_difference"] > 0 else "attention"


def write_route_patching(rows: pd.DataFrame, out: str | Path) -> dict[str, Any]:
    """From route rows (:func:`codi_lens.patching.route_sweep`, both donors if the control ran): ``cells.parquet``
    (:func:`route_cells`), ``contrasts.parquet`` (:func:`route_contrasts`), ``controls.parquet``
    (:func:`route_controls`), ``interactions.parquet`` (per pair and step), the figures ``routes.html`` and
    ``attention_by_layer.html``, and the summary's numbers: per step the recovery by each route, the interaction,
    the recurrence-minus-attention contrast, which route carries it, and each route against the control."""
    out = Path(out)
    used = used_rows(rows)
    cells = route_cells(rows)
    cells.to_parquet(out / "cells.parquet", index=False)
    contrasts = route_contrasts(rows)
    contrasts.to_parquet(out / "contrasts.parquet", index=False)
    controls = route_controls(rows)
    controls.to_parquet(out / "controls.parquet", index=False)
    joint = interactions(used[used["donor"] == "clean"])
    joint.to_parquet(out / "interactions.parquet", index=False)
    whole = cells[cells["family"] == "routes"]
    write_html(route_bars(whole), out / "routes.html")
    by_layer = cells[(cells["family"] == "layer") & (cells["donor"] == "clean")]
    if len(by_layer):
        write_html(route_layer_heatmap(by_layer), out / "attention_by_layer.html")
    steps = {}
    for target in dict.fromkeys(whole["target"]):
        entry: dict[str, Any] = {}
        for r in whole[(whole["target"] == target)].itertuples():
            entry[f"{r.route}" if r.donor == "clean" else f"{r.route}_other_problem"] = ci_triplet(
                r.mean, r.low, r.high
            )
        mine = joint[joint["target"] == target]["recovery"].to_numpy(dtype=float)
        if len(mine):
            entry["interaction"] = ci_triplet(*bootstrap_ci(mine))
        row = contrasts[contrasts["target"] == target] if len(contrasts) else contrasts
        if len(row):
            c = row.iloc[0]
            entry["recurrence_minus_attention"] = {
                "mean": ci_triplet(c["mean_difference"], c["low"], c["high"]),
                "cohens_d": round(float(c["cohens_d"]), 3),
                "wilcoxon_q": float(c["q"]),
                "carried_by": carried_by(c),
            }
        for c in controls[controls["target"] == target].itertuples() if len(controls) else ():
            entry[f"{c.route}_own_minus_other_problem"] = {
                "mean": ci_triplet(c.mean_difference, c.low, c.high),
                "cohens_d": round(float(c.cohens_d), 3),
                "wilcoxon_q": float(c.q),
            }
        steps[target] = entry
    return {
        "n_pairs": int(rows["pair_id"].nunique()),
        "n_pairs_used": int(used["pair_id"].nunique()),
        "skipped_by_reason": skipped_by_reason(rows, "pair_id"),
        "steps": steps,
    }


def route_report_lines(summary: dict[str, Any]) -> str:
    """What route patching prints: per step, each route's recovery with its CI and the route that carries it."""
    lines = [f"{summary['n_pairs_used']} of {summary['n_pairs']} pairs used; recovery [95% CI]:"]
    for target, entry in summary["steps"].items():
        parts = [
            f"{route} {entry[route][0]:.2f} [{entry[route][1]:.2f}, {entry[route][2]:.2f}]"
            for route in ("recurrence", "attention", "both")
            if route in entry
        ]
        carried = entry.get("recurrence_minus_attention", {}).get("carried_by")
        lines.append(f"  {target}: " + ", ".join(parts) + (f"; carried by: {carried}" if carried else ""))
    return "\n".join(lines)
