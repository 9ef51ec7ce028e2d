"""Reports of circuits at the answer: direct logit attribution and path patching tables, figures and summaries."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from codi_lens.plotting import attribution_bars, head_heatmap, path_bars, source_heatmap, write_html
from codi_lens.reports.summaries import ci_triplet
from codi_lens.run.outcome import skipped_by_reason
from codi_lens.stats import benjamini_hochberg, bootstrap_ci, mean_ci_table, sign_flip_pvalue

#: How many heads the source map and the summary show.
TOP_HEADS = 6


def head_table(rows: pd.DataFrame, run: str = "clean") -> pd.DataFrame:
    """Per head (one run): ``n`` pairs, mean direct contribution with its 95% bootstrap CI, a sign-flip
    permutation p-value (mean zero) and its Benjamini-Hochberg ``q`` and ``significant`` across all heads."""
    heads = rows[(rows["level"] == "head") & (rows["run"] == run)]
    table = mean_ci_table(heads, ["component", "layer", "head"], "contribution")
    grouped = heads.groupby(["component", "layer", "head"], sort=True)
    table["p"] = [sign_flip_pvalue(group["contribution"].to_numpy()) for _, group in grouped]
    table["significant"], table["q"] = benjamini_hochberg(table["p"].to_numpy())
    return table


def source_order(n_latents: int) -> list[str]:
    """The source positions in the order of the loop."""
    return ["question", "changed", "bot", *[f"thought:{k}" for k in range(1, n_latents + 1)], "eot", "answer"]


def write_logit_attribution(rows: pd.DataFrame, out: str | Path, n_layers: int, n_heads: int, n_latents: int) -> dict:
    """From direct logit attribution rows (:func:`codi_lens.logit_attribution.attribution_sweep`):
    ``parts.parquet`` (per run and layer-level part: mean and 95% CI), ``heads.parquet`` (:func:`head_table` of the
    clean run), ``sources.parquet`` (the top heads' sources), the figures ``parts.html``, ``heads.html`` and
    ``sources.html``, and the summary's numbers: each run's total, the largest parts, the top heads with the
    source each reads most from."""
    out = Path(out)
    used = rows[rows["reason"].fillna("") == ""]
    parts = mean_ci_table(used[used["level"] == "layer"], ["run", "component"], "contribution")
    order = ["embed", *[f"blocks.{layer}.{kind}" for layer in range(n_layers) for kind in ("attn", "mlp")]]
    parts["order"] = [order.index(c) if c in order else len(order) for c in parts["component"]]
    parts = parts.sort_values(["run", "order"]).drop(columns="order")
    parts.to_parquet(out / "parts.parquet", index=False)
    write_html(attribution_bars(parts), out / "parts.html")
    heads = head_table(used)
    heads.to_parquet(out / "heads.parquet", index=False)
    write_html(head_heatmap(heads, n_layers, n_heads), out / "heads.html")
    top = heads.reindex(heads["mean"].abs().sort_values(ascending=False).index).head(TOP_HEADS)
    sources = used[(used["level"] == "source") & (used["run"] == "clean") & used["component"].isin(top["component"])]
    source_means = mean_ci_table(sources, ["component", "source"], "contribution")
    source_means["rank"] = source_means["component"].map({c: i for i, c in enumerate(top["component"])})
    source_means = source_means.sort_values(["rank", "source"]).drop(columns="rank")
    source_means.to_parquet(out / "sources.parquet", index=False)
    present = [s for s in source_order(n_latents) if s in set(source_means["source"])]
    if len(source_means):
        write_html(source_heatmap(source_means, present), out / "sources.html")
    totals = used.drop_duplicates(["pair_id", "run"])
    summary: dict[str, Any] = {
        "n_pairs": int(rows["pair_id"].nunique()),
        "n_pairs_used": int(used["pair_id"].nunique()),
        "skipped_by_reason": skipped_by_reason(rows, "pair_id"),
        "total": {run: ci_triplet(*_mean_ci(group["total"])) for run, group in totals.groupby("run", sort=True)},
        "largest_parts": [
            {"run": r.run, "component": r.component, "contribution": ci_triplet(r.mean, r.low, r.high)}
            for r in parts.reindex(parts["mean"].abs().sort_values(ascending=False).index).head(4).itertuples()
        ],
        "top_heads": [],
    }
    for r in top.itertuples():
        mine = source_means[source_means["component"] == r.component]
        best = mine.loc[mine["mean"].abs().idxmax()] if len(mine) else None
        summary["top_heads"].append(
            {
                "head": r.component,
                "contribution": ci_triplet(r.mean, r.low, r.high),
                "bh_q": float(r.q),
                "reads_most_from": None if best is None else str(best["source"]),
                # A share of a contribution whose CI holds 0 means nothing (it can be -300%): none is given.
                "share_from_there": None
                if best is None or r.low <= 0 <= r.high
                else round(float(best["mean"] / r.mean), 3),
            }
        )
    return summary


def _mean_ci(values: pd.Series) -> tuple[float, float, float]:
    return bootstrap_ci(values.to_numpy(dtype=np.float64))


def attribution_report_lines(summary: dict[str, Any]) -> str:
    """What logit attribution prints: the totals, the largest parts and the top heads with their main source."""
    lines = [f"{summary['n_pairs_used']} of {summary['n_pairs']} pairs used; logit difference [95% CI]:"]
    for run, (mean, low, high) in summary["total"].items():
        lines.append(f"  {run} run: {mean:.2f} [{low:.2f}, {high:.2f}]")
    lines.append("largest parts:")
    for part in summary["largest_parts"]:
        mean, low, high = part["contribution"]
        lines.append(f"  {part['run']} {part['component']}: {mean:.2f} [{low:.2f}, {high:.2f}]")
    lines.append("top heads (clean run):")
    for head in summary["top_heads"]:
        mean, low, high = head["contribution"]
        lines.append(
            f"  {head['head']}: {mean:.2f} [{low:.2f}, {high:.2f}], reads most from {head['reads_most_from']}"
            f" ({head['share_from_there']:.0%} of it)"
            if head["share_from_there"] is not None
            else f"  {head['head']}: {mean:.2f} [{low:.2f}, {high:.2f}]"
        )
    return "\n".join(lines)


def path_table(rows: pd.DataFrame) -> pd.DataFrame:
    """Per path: ``n`` pairs, mean recovery with its 95% bootstrap CI, a sign-flip permutation p-value and the
    Benjamini-Hochberg ``q`` and ``significant`` across every path."""
    used = rows[rows["reason"].fillna("") == ""]
    table = mean_ci_table(used, ["group", "path"], "recovery")
    grouped = used.groupby(["group", "path"], sort=True)
    table["p"] = [sign_flip_pvalue(group["recovery"].to_numpy()) for _, group in grouped]
    table["significant"], table["q"] = benjamini_hochberg(table["p"].to_numpy())
    order = list(dict.fromkeys(used["path"]))
    return table.sort_values("path", key=lambda s: s.map(order.index)).reset_index(drop=True)


def write_path_patching(rows: pd.DataFrame, out: str | Path) -> dict[str, Any]:
    """From path patching rows (:func:`codi_lens.patching.paths.path_sweep`): ``paths.parquet``
    (:func:`path_table`), the figure ``paths.html`` and the summary's numbers (every path's recovery with its CI
    and q)."""
    out = Path(out)
    used = rows[rows["reason"].fillna("") == ""]
    table = path_table(rows)
    table.to_parquet(out / "paths.parquet", index=False)
    write_html(path_bars(table), out / "paths.html")
    return {
        "n_pairs": int(rows["pair_id"].nunique()),
        "n_pairs_used": int(used["pair_id"].nunique()),
        "skipped_by_reason": skipped_by_reason(rows, "pair_id"),
        "paths": {
            r.path: {"recovery": ci_triplet(r.mean, r.low, r.high), "bh_q": float(r.q), "group": r.group}
            for r in table.itertuples()
        },
    }


def path_report_lines(summary: dict[str, Any]) -> str:
    """What path patching prints: every path's recovery with its CI, starred where it survives the correction."""
    lines = [f"{summary['n_pairs_used']} of {summary['n_pairs']} pairs used; recovery [95% CI] (* BH q < 0.05):"]
    for name, entry in summary["paths"].items():
        mean, low, high = entry["recovery"]
        lines.append(f"  {name}: {mean:.3f} [{low:.3f}, {high:.3f}]{' *' if entry['bh_q'] < 0.05 else ''}")
    return "\n".join(lines)
