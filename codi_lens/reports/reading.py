"""Report of the reading pipeline (:func:`codi_lens.reading.read_thoughts`): tables, figures and the summary."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from codi_lens.lens import readout_anywhere, readout_rates
from codi_lens.plotting import (
    answer_readout_lines,
    early_answer_curves,
    probe_accuracy_lines,
    readout_heatmaps,
    value_patching_bars,
    write_html,
)
from codi_lens.probes import cells_chosen_on_validation, selectivity
from codi_lens.reading import Reading
from codi_lens.reports.summaries import ci_triplet
from codi_lens.stats import clustered_bootstrap_ci, mean_ci_table

LENSES = ("logit", "tuned")


def value_patching_summary(rows: pd.DataFrame) -> dict[str, Any]:
    """Per condition, pooled over thoughts and steps: accuracy and (different) moved rate, with 95% CIs
    from a bootstrap over problems."""
    out = {}
    for condition, group in rows.groupby("condition"):
        stats = {"n_rows": len(group)}
        for value in ("correct", "moved"):
            if group[value].notna().any():
                part = group.dropna(subset=[value]).astype({value: float})
                stats[value] = ci_triplet(*clustered_bootstrap_ci(part, np.mean, [value]))
        out[condition] = stats
    return out


def _early_table(early: pd.DataFrame) -> pd.DataFrame:
    return pd.concat(
        [
            mean_ci_table(early.assign(group="all"), ["group", "k"], "correct"),
            mean_ci_table(early.assign(group=early["n_steps"].astype(str)), ["group", "k"], "correct"),
        ],
        ignore_index=True,
    )


def _write_value_patching(patched: pd.DataFrame, out: Path) -> None:
    if not len(patched):
        return
    mean_ci_table(patched, ["condition", "step", "thought"], "correct").to_parquet(
        out / "value_patching.parquet", index=False
    )
    write_html(value_patching_bars(patched, "correct"), out / "value_patching.html")
    different = patched[patched["condition"] == "different"]
    moved = different.dropna(subset=["moved"]).astype({"moved": float})
    mean_ci_table(moved, ["condition", "step", "thought"], "moved").to_parquet(
        out / "value_patching_moved.parquet", index=False
    )
    if len(different):
        write_html(value_patching_bars(different, "moved"), out / "value_patching_moved.html")


def write_read_thoughts(reading: Reading, out: str | Path, *, top_k: int, n_layers: int) -> dict[str, Any]:
    """``readout_rates.parquet`` (top-1 and top-k rates with 95% CIs), ``readout_anywhere.parquet``,
    ``decodes.parquet``, ``probes.parquet``, ``early_answers.parquet`` (accuracy by k with CIs),
    ``value_patching.parquet`` (accuracy after the patch), ``value_patching_moved.parquet`` (how often the
    answer moved to the patched value's prediction) and the figures ``readout_logit.html``, ``readout_tuned.html``,
    ``answer_readout.html``, ``probes.html``, ``early_answers.html``, ``value_patching.html`` and
    ``value_patching_moved.html``. Returns the summary's numbers."""
    out = Path(out)
    readout = reading.readout
    rates = pd.concat([readout_rates(readout, k=k).assign(k=k) for k in (1, top_k)])
    anywhere = pd.concat([readout_anywhere(readout, k=k).assign(k=k) for k in (1, top_k)])
    rates.to_parquet(out / "readout_rates.parquet", index=False)
    anywhere.to_parquet(out / "readout_anywhere.parquet", index=False)
    for name in LENSES:
        write_html(readout_heatmaps(rates[rates["k"] == 1], name), out / f"readout_{name}.html")
    write_html(answer_readout_lines(rates[rates["k"] == 1]), out / "answer_readout.html")
    reading.decodes.to_parquet(out / "decodes.parquet", index=False)
    probes = reading.probes
    probes.to_parquet(out / "probes.parquet", index=False)
    if len(probes):
        write_html(probe_accuracy_lines(probes, layer=n_layers), out / "probes.html")
    early = _early_table(reading.early)
    early.to_parquet(out / "early_answers.parquet", index=False)
    write_html(early_answer_curves(early), out / "early_answers.html")
    _write_value_patching(reading.patched, out)
    headline = anywhere[anywhere["target"] == "intermediate"]
    best_probes = selectivity(probes).merge(cells_chosen_on_validation(probes), on=["target", "layer", "thought"])
    return {
        "n_problems": len(reading.states.correct),
        "n_fit": len(reading.fit),
        "n_eval": len(reading.evaluated),
        "eval_accuracy": round(float(reading.states.correct[reading.evaluated].mean()), 4),
        "intermediate_values": reading.n_values,
        "single_token_values": reading.n_single_token_values,
        "lens_layers": "0 = input of block 0, l = output of block l-1; final norm applied",
        "value_top_k_somewhere": {
            f"{r.lens}/{'control' if r.control else 'own'}/step {int(r.step)}/top{int(r.k)}": ci_triplet(
                r.rate, r.low, r.high
            )
            for r in headline.itertuples()
        },
        "probe_at_best_validation_cell": {
            r.target: {
                "layer": int(r.layer),
                "thought": int(r.thought),
                "probe": round(float(r.probe), 4),
                "control": round(float(r.control), 4),
                "chance": round(float(r.chance), 4),
            }
            for r in best_probes.itertuples()
        },
        "early_answer_accuracy": {
            int(r.k): ci_triplet(r.mean, r.low, r.high) for r in early[early["group"] == "all"].itertuples()
        },
        "value_patching": value_patching_summary(reading.patched) if len(reading.patched) else {},
    }
