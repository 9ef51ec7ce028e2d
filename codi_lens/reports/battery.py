"""The parts of the one-command report (``experiments.report``): each runs one analysis of the library on the
first ``n`` problems or minimal pairs, resumably, in its own folder, and returns the sections of the page.

A part is a :class:`Part`: its name, the unit it is sized in (``problems`` or ``pairs``), the smallest size that
gives a reading, the reason it cannot run on a model (:attr:`Part.unavailable`), and :attr:`Part.run`, which writes
the analysis's own tables and figures (the same files its ``experiments.<name>`` command writes) and returns
:class:`Section`\\ s. A section's table is read from (or is) one of those files, its headline numbers come from that
table, and its reading is two lines generated from the numbers: where a CI holds zero, the reading says so.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from sae_lens import SAE

from codi_lens.accuracy import accuracy_table, evaluate_conditions
from codi_lens.core.model import CODIModel
from codi_lens.core.registry import Registry
from codi_lens.data.problems import Problem
from codi_lens.data.sources import load_problems
from codi_lens.data.templates import shared_with_step
from codi_lens.feature_screen import screen_features
from codi_lens.importance import attention_importance, step_importance
from codi_lens.lens import readout_anywhere
from codi_lens.patching import patch_sweep, route_patches, route_sweep, sweep_sites, trajectory_sweep
from codi_lens.plotting import accuracy_bars, ci_bars, importance_by_thought, screen_volcano
from codi_lens.probes import cells_chosen_on_validation
from codi_lens.reading import read_thoughts
from codi_lens.reports.importance import write_ablation_attention, write_step_importance
from codi_lens.reports.model_report import model_conditions
from codi_lens.reports.patching import write_iterative_patching, write_position_patching, write_route_patching
from codi_lens.reports.reading import write_read_thoughts
from codi_lens.reports.saes import write_screen
from codi_lens.run.executors import Executor
from codi_lens.run.outcome import NothingToMeasureError, stop_if_nothing_measured
from codi_lens.stats import bootstrap_ci


@dataclass(frozen=True)
class ReportInputs:
    """What every part runs on.

    Attributes:
        model: the checkpoint under study; ``baseline``: its no-CoT twin, when given.
        saes: SAEs on the thoughts by site (:func:`~codi_lens.saes.ids.saes_by_site`), when given.
        problems: the report's problems, in order (a part sized ``n`` takes the first ``n``).
        pairs: minimal pairs made from ``problems`` (one number changed, the answer recomputed).
        settings: the settings that change a result (the model's and the data's), recorded by every sub-run.
    """

    model: CODIModel
    problems: list[Problem]
    pairs: pd.DataFrame
    settings: dict[str, Any]
    executor: Executor
    baseline: CODIModel | None = None
    saes: Mapping[str, SAE] | None = None
    n_latents: int = 6
    max_new_tokens: int = 256
    batch_size: int = 16
    seed: int = 0

    def units(self, unit: str) -> int:
        """How many problems, pairs or template problems there are."""
        return {"problems": len(self.problems), "pairs": len(self.pairs), "template problems": len(TEMPLATE)}[unit]

    def unit_ids(self, unit: str, n: int) -> list[str]:
        """The ids of the first ``n`` problems, pairs or template problems (what a part sized ``n`` runs on)."""
        if unit == "pairs":
            return [str(i) for i in self.pairs["pair_id"].head(n)]
        return [p.id for p in (TEMPLATE if unit == "template problems" else self.problems)[:n]]

    def sweep_options(self, part: str) -> dict[str, Any]:
        return {
            "n_latents": self.n_latents,
            "max_new_tokens": self.max_new_tokens,
            "batch_size": self.batch_size,
            "settings": {**self.settings, "report_part": part},
            "executor": self.executor,
        }


@dataclass
class Section:
    """One section of the page: a heading, the main figure, a table with CIs, its headline numbers (what
    ``report.json`` records) and a reading of two lines generated from them."""

    title: str
    table: pd.DataFrame
    figure: go.Figure | None
    headline: dict[str, Any]
    reading: list[str]
    source: str = ""  # the file of the part's own outputs that ``table`` is read from


@dataclass(frozen=True)
class Part:
    """One analysis of the report (see the module docstring)."""

    name: str
    title: str
    unit: str
    run: Callable[[ReportInputs, int, Path], list[Section]]
    minimum: int = 4
    unavailable: Callable[[ReportInputs], str | None] = field(default=lambda inputs: None)


PARTS: Registry[Part] = Registry("report part")


def ci_text(values: tuple[float, float, float] | list[float], digits: int = 2, percent: bool = False) -> str:
    """``0.42 [0.31, 0.55]`` (or ``42% [31%, 55%]``); ``0.42 (no CI: too few problems)`` when the bootstrap gave
    none."""
    scale, suffix = (100, "%") if percent else (1, "")
    mean, low, high = (float(v) * scale for v in values)
    fmt = f"{{:.{0 if percent else digits}f}}{suffix}"
    if math.isnan(low) or math.isnan(high):
        return f"{fmt.format(mean)} (no CI: too few problems)"
    return f"{fmt.format(mean)} [{fmt.format(low)}, {fmt.format(high)}]"


def holds_zero(low: float, high: float) -> bool:
    """Whether a CI includes zero (or is undefined)."""
    return not (low > 0 or high < 0)


def triplet(row: Any, value: str, low: str = "low", high: str = "high") -> list[float]:
    """``[value, low, high]`` of a table row (a named tuple or a Series), rounded to 4 decimals."""
    get = row.__getitem__ if isinstance(row, pd.Series) else lambda name: getattr(row, name)
    return [round(float(get(name)), 4) for name in (value, low, high)]


# ---------------------------------------------------------------------------------------------- accuracy
def run_accuracy(inputs: ReportInputs, n: int, out: Path) -> list[Section]:
    conditions = model_conditions(
        inputs.model, n_latents=inputs.n_latents, budget=inputs.max_new_tokens, baseline=inputs.baseline
    )
    predictions, store = evaluate_conditions(
        conditions,
        inputs.problems[:n],
        out,
        batch_size=inputs.batch_size,
        settings={**inputs.settings, "report_part": "accuracy"},
        executor=inputs.executor,
    )
    table = accuracy_table(predictions)
    table.to_parquet(out / "accuracy.parquet", index=False)
    overall = table[table["group"] == "all"].set_index("condition")
    wide = predictions.pivot(index="problem_id", columns="condition", values="correct").astype(float)
    drop = bootstrap_ci((wide["latents"] - wide["zero_all_thoughts"]).to_numpy())
    store.finish(predictions, {"accuracy": overall["accuracy"].to_dict(), "drop_when_zeroed": drop})
    with_thoughts = triplet(overall.loc["latents"], "accuracy")
    zeroed = triplet(overall.loc["zero_all_thoughts"], "accuracy")
    headline = {
        "accuracy": with_thoughts,
        "accuracy_thoughts_zeroed": zeroed,
        "drop_when_zeroed": [round(float(x), 4) for x in drop],
        "accuracy_teacher_explicit_cot": triplet(overall.loc["teacher_explicit_cot"], "accuracy"),
        "n_problems": int(overall.loc["latents", "n"]),
    }
    if "no_cot_baseline" in overall.index:
        headline["accuracy_no_cot_baseline"] = triplet(overall.loc["no_cot_baseline"], "accuracy")
    depends = (
        "its CI holds zero, so there is no evidence here that the answers depend on the thoughts"
        if holds_zero(drop[1], drop[2])
        else "the answers depend on the thoughts"
    )
    reading = [
        f"With its thoughts the model answers {ci_text(with_thoughts, percent=True)} of {headline['n_problems']} "
        f"problems; with all {inputs.n_latents} thoughts zeroed, {ci_text(zeroed, percent=True)}.",
        f"Zeroing them costs {ci_text([100 * x for x in drop], digits=0)} points; {depends}.",
    ]
    figure = accuracy_bars(table, title="Accuracy with and without the thoughts (95% CI over problems)")
    return [Section("Accuracy with and without the thoughts", table, figure, headline, reading, "accuracy.parquet")]


# ---------------------------------------------------------------------------------------------- step importance
IMPORTANCE_INTERVENTIONS = ("zero", "mean", "swap")
IMPORTANCE_SCOPES = ("single", "cumulative")


def run_step_importance(inputs: ReportInputs, n: int, out: Path) -> list[Section]:
    options = inputs.sweep_options("step_importance")
    rows, store = step_importance(
        inputs.model,
        inputs.problems[:n],
        out,
        interventions=IMPORTANCE_INTERVENTIONS,
        scopes=IMPORTANCE_SCOPES,
        seed=inputs.seed,
        **options,
    )
    summary = write_step_importance(rows, out, "zero", "single")
    store.finish(rows, summary)
    table = pd.read_parquet(out / "importance.parquet")
    table = table[table["scope"].isin(IMPORTANCE_SCOPES)][
        ["intervention", "scope", "thought", "n", "importance", "importance_low", "importance_high"]
    ]
    single = table[(table["scope"] == "single")]
    headline = {
        f"{r.intervention}/{r.scope}/thought {int(r.thought)}": triplet(
            r, "importance", "importance_low", "importance_high"
        )
        for r in table.itertuples()
    }
    reading = importance_reading(single, summary["baseline_accuracy"])
    figure = importance_by_thought(table, "importance")
    return [Section("Step importance", table, figure, headline, reading, "importance.parquet")]


def importance_reading(single: pd.DataFrame, baseline_accuracy: float) -> list[str]:
    """Two lines on the single-thought ablations (importance: the share of problems answered right at baseline
    and wrong when ablated): where zeroing does most and least, and what a swap does."""
    defined = single.dropna(subset=["importance"])
    zero = defined[defined["intervention"] == "zero"].sort_values("importance")
    swap = defined[defined["intervention"] == "swap"].sort_values("importance")
    if zero.empty or baseline_accuracy == 0:
        return ["The baseline answers none of these problems right: no right answer can break.", ""]
    values = lambda r: [r["importance"], r["importance_low"], r["importance_high"]]  # noqa: E731
    most, least = zero.iloc[-1], zero.iloc[0]
    lines = [
        f"Of the problems ({100 * baseline_accuracy:.0f}% answered right at baseline), zeroing one thought turns "
        f"the most right answers wrong at thought {int(most['thought'])}: {ci_text(values(most), percent=True)}; "
        f"the fewest at thought {int(least['thought'])}: {ci_text(values(least), percent=True)}."
    ]
    if swap.empty:
        return [*lines, "The swap (another problem's thought) was not measured."]
    top, bottom = swap.iloc[-1], swap.iloc[0]
    specific = not holds_zero(top["importance_low"], top["importance_high"])
    return [
        *lines,
        f"Another problem's thought (swap) turns {ci_text(values(top), percent=True)} wrong at thought "
        f"{int(top['thought'])}, {ci_text(values(bottom), percent=True)} at thought {int(bottom['thought'])}: "
        + (
            "the thoughts carry problem-specific content."
            if specific
            else "no CI excludes zero, so no problem-specific content is shown."
        ),
    ]


# ---------------------------------------------------------------------------------------------- attention
def run_attention(inputs: ReportInputs, n: int, out: Path) -> list[Section]:
    options = inputs.sweep_options("attention")
    rows, store = attention_importance(inputs.model, inputs.problems[:n], out, **options)
    summary, _ = write_ablation_attention(rows, out, seed=inputs.seed)
    store.finish(rows, summary)
    table = pd.read_parquet(out / "correlations.parquet")
    columns = ["pairing", "layer", "n", "spearman", "spearman_low", "spearman_high"]
    table = table[[c for c in columns if c in table.columns]]
    own = table[table["pairing"] == "same problem"]
    control = table[table["pairing"] != "same problem"]
    headline = {
        f"{r.pairing}/layer {int(r.layer)}": triplet(r, "spearman", "spearman_low", "spearman_high")
        for r in table.itertuples()
    }
    reading = attention_reading(own, control)
    figure = ci_bars(
        table, "layer", "spearman", "spearman_low", "spearman_high", color="pairing",
        title="Attention to a thought vs the cost of zeroing it: Spearman per layer (95% CI over problems)",
    )  # fmt: skip
    return [
        Section(
            "Attention to the thoughts vs their importance", table, figure, headline, reading, "correlations.parquet"
        )
    ]


def attention_reading(own: pd.DataFrame, control: pd.DataFrame) -> list[str]:
    """Two lines: the layer with the largest |Spearman|, how many layers exclude zero, and the control's count."""
    own = own.dropna(subset=["spearman"])
    if own.empty:
        return ["No correlation is defined: zeroing a thought never changed the answer's distribution here.", ""]
    best = own.loc[own["spearman"].abs().idxmax()]
    excluded = int((~own.apply(lambda r: holds_zero(r["spearman_low"], r["spearman_high"]), axis=1)).sum())
    control = control.dropna(subset=["spearman"])
    control_excluded = int((~control.apply(lambda r: holds_zero(r["spearman_low"], r["spearman_high"]), axis=1)).sum())
    return [
        "Attention from EOT to a thought against the cost of zeroing it: largest |Spearman| at layer "
        f"{int(best['layer'])}, Spearman {ci_text(triplet(best, 'spearman', 'spearman_low', 'spearman_high'))}; "
        f"{excluded} of {len(own)} layers have a CI that excludes zero.",
        f"Paired with the next problem's importance (control), {control_excluded} of {len(control)} layers do"
        + (
            ": part of the correlation follows the thoughts' average profile, not problem-specific use."
            if control_excluded
            else (": what correlates is problem-specific." if excluded else ".")
        ),
    ]


# ---------------------------------------------------------------------------------------------- patching
PATCH_KINDS = ["resid_post", "thought_input"]


def run_patching(inputs: ReportInputs, n: int, out: Path) -> list[Section]:
    cfg = inputs.model.cfg
    sites = sweep_sites(cfg.n_layers, inputs.n_latents, kinds=PATCH_KINDS, n_heads=cfg.n_heads, layer_only=True)
    rows, store = patch_sweep(inputs.model, inputs.pairs.head(n), out, sites=sites, **inputs.sweep_options("patching"))
    stop_if_nothing_measured(rows, store, unit_column="pair_id", noun="pairs")
    summary, cells = write_position_patching(rows, out, PATCH_KINDS, inputs.n_latents)
    store.finish(rows, summary)
    table = pd.read_parquet(out / "cells.parquet").sort_values("recovery", ascending=False)
    columns = ["hook", "position", "n", "recovery", "recovery_low", "recovery_high", "q"]
    table = table[[c for c in columns if c in table.columns]].head(12).reset_index(drop=True)
    headline = {
        f"{r.hook}@{r.position}": triplet(r, "recovery", "recovery_low", "recovery_high") for r in table.itertuples()
    }
    best = table.iloc[0]
    significant = int((cells["q"] < 0.05).sum()) if "q" in cells else 0
    reading = [
        f"Patching the clean run into the corrupted one recovers most at {best['hook']} @ {best['position']}: "
        f"{ci_text([best['recovery'], best['recovery_low'], best['recovery_high']])} of the clean answer "
        f"({summary['n_pairs_used']} pairs used of {summary['n_pairs']}).",
        f"{significant} of {len(cells)} sites recover more than zero at BH q < 0.05.",
    ]
    figure = ci_bars(
        table.assign(site=table["hook"] + " @ " + table["position"]), "site", "recovery", "recovery_low",
        "recovery_high", title="The 12 sites that recover most of the clean answer (95% CI over pairs)",
    )  # fmt: skip
    return [Section("Minimal-pair patching", table, figure, headline, reading, "cells.parquet")]


def run_routes(inputs: ReportInputs, n: int, out: Path) -> list[Section]:
    pairs = inputs.pairs.head(n)
    patches = route_patches(inputs.model.cfg.n_layers, inputs.n_latents, None, by_layer=False)
    options = inputs.sweep_options("routes")
    rows, store = route_sweep(inputs.model, pairs, out, patches=patches, **options)
    stop_if_nothing_measured(rows, store, unit_column="pair_id", noun="pairs")
    other, other_store = route_sweep(inputs.model, pairs, out / "other", patches=patches, donor="other", **options)
    other_store.finish(other, {"donor": "other"})
    summary = write_route_patching(pd.concat([rows, other], ignore_index=True), out)
    store.finish(rows, summary)
    contrasts = pd.read_parquet(out / "contrasts.parquet")
    table = contrasts[["target", "n", "mean_difference", "low", "high", "q"]].reset_index(drop=True)
    headline = {f"recurrence_minus_attention/{r.target}": triplet(r, "mean_difference") for r in table.itertuples()}
    recurrence = table[(table["low"] > 0) & (table["q"] < 0.05)]
    attention = table[(table["high"] < 0) & (table["q"] < 0.05)]
    reading = [
        f"Recovery through the fed thought (recurrence) minus through attention to earlier positions, per step: "
        f"recurrence carries more at {len(recurrence)} of {len(table)} steps, attention at {len(attention)} "
        "(CI excludes zero and BH q < 0.05).",
        "Steps where neither holds: "
        + (
            ", ".join(str(t) for t in table[~table.index.isin(recurrence.index.union(attention.index))]["target"])
            or "none"
        )
        + ".",
    ]
    figure = ci_bars(
        table, "target", "mean_difference", "low", "high",
        title="Recurrence minus attention: recovery of the clean answer per step (95% CI over pairs)",
    )  # fmt: skip
    return [Section("Route patching: recurrence or attention", table, figure, headline, reading, "contrasts.parquet")]


def run_chained(inputs: ReportInputs, n: int, out: Path) -> list[Section]:
    layers = range(inputs.model.cfg.n_layers)
    rows, store = trajectory_sweep(inputs.model, inputs.pairs.head(n), layers, out, **inputs.sweep_options("chained"))
    stop_if_nothing_measured(rows, store, unit_column="pair_id", noun="pairs")
    summary = write_iterative_patching(rows, out)
    store.finish(rows, summary)
    table = pd.read_parquet(out / "final_recovery.parquet")
    difference = table[table["mode"] == "chained_minus_parallel"]
    headline = {f"{r.mode}/{r.cell}": triplet(r, "mean") for r in table.itertuples()}
    parallel_better = difference[difference["high"] < 0]
    chained_better = difference[difference["low"] > 0]
    reading = [
        f"Chained patching (each patched thought fed back) minus parallel patching (cached clean values): "
        f"chained recovers more in {len(chained_better)} of {len(difference)} cells, parallel in "
        f"{len(parallel_better)} (95% CI excludes zero).",
        "Largest difference: "
        + (
            "{} {}".format(
                difference.loc[difference["mean"].abs().idxmax(), "cell"],
                ci_text(triplet(difference.loc[difference["mean"].abs().idxmax()], "mean")),
            )
            if len(difference)
            else "none measured"
        )
        + ".",
    ]
    figure = ci_bars(
        table, "cell", "mean", "low", "high", color="mode",
        title="Final recovery of chained and parallel patching, and their difference (95% CI over pairs)",
    )  # fmt: skip
    return [Section("Chained vs parallel patching", table, figure, headline, reading, "final_recovery.parquet")]


# ---------------------------------------------------------------------------------------------- reading
def run_reading(inputs: ReportInputs, n: int, out: Path) -> list[Section]:
    reading, store = read_thoughts(
        inputs.model,
        inputs.problems[:n],
        out,
        n_latents=inputs.n_latents,
        max_new_tokens=inputs.max_new_tokens,
        batch_size=inputs.batch_size,
        seed=inputs.seed,
        settings={**inputs.settings, "report_part": "reading"},
        executor=inputs.executor,
    )
    summary = write_read_thoughts(reading, out, top_k=5, n_layers=inputs.model.cfg.n_layers)
    store.finish(reading.readout, summary)
    return [lens_section(out, inputs.model.cfg.n_layers), probe_section(out), early_section(out), value_section(out)]


def lens_section(out: Path, final_layer: int) -> Section:
    anywhere = pd.read_parquet(out / "readout_anywhere.parquet")
    table = anywhere[anywhere["target"] == "intermediate"].drop(columns=["target"]).reset_index(drop=True)
    by_steps = readout_by_problem_steps(pd.read_parquet(out / "results.parquet"), final_layer)
    by_steps.to_parquet(out / "readout_by_problem_steps.parquet", index=False)
    k = int(table["k"].min())  # top-1: a small vocabulary puts almost any value in a top 5 (see the control)
    headline = {
        f"{r.lens}/{'control' if r.control else 'own'}/step {int(r.step)}/top{int(r.k)}": triplet(r, "rate")
        for r in table.itertuples()
    }
    headline |= {
        f"final layer/{'control' if r.control else 'own'}/{int(r.n_steps)}-step problems/top{READOUT_K}": triplet(
            r, "rate"
        )
        for r in by_steps.itertuples()
    }
    top = table[(table["k"] == k) & (table["lens"] == "logit")]
    own, control = top[~top["control"]], top[top["control"]]
    lines = []
    for r in own.itertuples():
        c = control[control["step"] == r.step]
        versus = f" (control {ci_text(triplet(c.iloc[0], 'rate'), percent=True)})" if len(c) else ""
        lines.append(f"step {int(r.step)} {ci_text(triplet(r, 'rate'), percent=True)}{versus}")
    reading = [
        f"Intermediate values that are the logit lens's top {k} at some thought and layer, by the value's step: "
        + "; ".join(lines)
        + ".",
        "The control scores the same readout on another problem's values: only the gap above it is read out.",
    ]
    shown = table[table["k"] == k].assign(which=lambda t: t["lens"] + np.where(t["control"], " (control)", ""))
    figure = ci_bars(
        shown, "step", "rate", "low", "high", color="which",
        title=f"Intermediate values read from the thoughts (top-{k} at some layer and thought; 95% CI over problems)",
    )  # fmt: skip
    return Section("Logit and tuned lens readout", table, figure, headline, reading, "readout_anywhere.parquet")


#: The top-k of the CODI paper's readout of intermediate results (its Table 3).
READOUT_K = 5


def readout_by_problem_steps(readout: pd.DataFrame, final_layer: int) -> pd.DataFrame:
    """Share of a problem's intermediate values in the logit lens's top :data:`READOUT_K` at the final layer of
    some latent position (BOT or a thought), per number of steps of the problem, with its control (another
    problem's values) and a 95% bootstrap CI over problems (``n`` counts values): the CODI paper's Table 3
    measure, as near as the readout allows."""
    final = readout[(readout["lens"] == "logit") & (readout["layer"] == final_layer)]
    return readout_anywhere(final[final["target"] == "intermediate"], k=READOUT_K, by=("n_steps", "control"))


def probe_section(out: Path) -> Section:
    probes = pd.read_parquet(out / "probes.parquet")
    if probes.empty:
        reading = ["No probe could be fitted on these problems (too few problems per value).", ""]
        return Section("Linear probes", probes, None, {}, reading, "probes.parquet")
    table = probes.merge(cells_chosen_on_validation(probes), on=["target", "layer", "thought"])[
        ["target", "layer", "thought", "task", "accuracy", "low", "high", "chance"]
    ].reset_index(drop=True)
    headline = {f"{r.target}/{r.task}": triplet(r, "accuracy") for r in table.itertuples()}
    wide = table.pivot_table(index="target", columns="task", values=["accuracy", "low", "high"])
    above = wide[wide[("low", "probe")] > wide[("high", "control")]] if ("high", "control") in wide else wide.iloc[:0]
    margin = (above[("accuracy", "probe")] - above[("accuracy", "control")]).sort_values(ascending=False)
    best = [
        f"{target} {100 * wide.loc[target, ('accuracy', 'probe')]:.0f}% against "
        f"{100 * wide.loc[target, ('accuracy', 'control')]:.0f}%"
        for target in margin.index[:3]
    ]
    reading = [
        f"{len(above)} of {len(wide)} targets are read by a linear probe above its shuffled-label control (the "
        "probe's CI above the control's), at the cell chosen on validation"
        + (f"; the widest margins: {', '.join(best)}." if best else "."),
        "Targets below the control carry no information a linear probe finds at that cell (the table has each).",
    ]
    figure = ci_bars(
        table,
        "target",
        "accuracy",
        "low",
        "high",
        color="task",
        title="Linear probes at the best validation cell (95% CI)",
    )
    return Section("Linear probes", table, figure, headline, reading, "probes.parquet")


def early_section(out: Path) -> Section:
    early = pd.read_parquet(out / "early_answers.parquet")
    table = early[early["group"] == "all"].reset_index(drop=True)
    headline = {f"after thought {int(r.k)}": triplet(r, "mean") for r in table.itertuples()}
    jumps = table["mean"].diff().fillna(0.0)
    first, last = table.iloc[0], table.iloc[-1]
    reading = [
        f"Answering after k thoughts: {ci_text(triplet(first, 'mean'), percent=True)} at k = {int(first['k'])}, "
        f"{ci_text(triplet(last, 'mean'), percent=True)} at k = {int(last['k'])}.",
        f"The largest rise comes with thought {int(table.loc[jumps.idxmax(), 'k'])} ({100 * jumps.max():.0f} points).",
    ]
    figure = ci_bars(
        table, "k", "mean", "low", "high", title="Accuracy when the answer is asked after k thoughts (95% CI)"
    )
    return Section("Early answers", table, figure, headline, reading, "early_answers.parquet")


def control_line(correct: pd.DataFrame, moved: pd.DataFrame) -> str:
    """At the cell where the answer moved most: accuracy with the problem's own value and with any value's mean."""
    if moved.empty:
        return "No cell had a prediction to move to."
    top = moved.sort_values("mean").iloc[-1]
    cell = correct[(correct["step"] == top["step"]) & (correct["thought"] == top["thought"])].set_index("condition")
    if not {"same", "any_value"} <= set(cell.index):
        return "The own-value and any-value controls were not measured at that cell."
    return (
        f"At that cell (step {int(top['step'])}, thought {int(top['thought'])}) the problem's own value keeps "
        f"{ci_text(triplet(cell.loc['same'], 'mean'), percent=True)} right; the mean of any value (control) "
        f"{ci_text(triplet(cell.loc['any_value'], 'mean'), percent=True)}."
    )


def value_section(out: Path) -> Section:
    if not (out / "value_patching.parquet").exists():
        reading = ["No value had enough reference problems to patch.", ""]
        return Section("Value-matched patching", pd.DataFrame(), None, {}, reading, "value_patching.parquet")
    correct = pd.read_parquet(out / "value_patching.parquet").assign(measure="correct")
    moved = pd.read_parquet(out / "value_patching_moved.parquet").assign(measure="moved")
    moved = moved if "step" in moved.columns else pd.DataFrame(columns=correct.columns)
    table = pd.concat([correct, moved], ignore_index=True)
    headline = {
        f"{r.measure}/{r.condition}/step {int(r.step)}/thought {int(r.thought)}": triplet(r, "mean")
        for r in table.itertuples()
    }
    lines = []
    for step, group in moved.groupby("step"):
        top = group.sort_values("mean").iloc[-1]
        lines.append(
            f"step {int(step)}'s value at thought {int(top['thought'])}: {ci_text(triplet(top, 'mean'), percent=True)}"
        )
    reading = [
        "A thought replaced by the mean thought of problems with another value moves the answer to that value's "
        "prediction most for " + ("; ".join(lines) or "no step (no prediction could be made)") + ".",
        control_line(correct, moved),
    ]
    figure = ci_bars(
        moved.assign(cell="step " + moved["step"].astype(str) + ", thought " + moved["thought"].astype(str)),
        "cell", "mean", "low", "high",
        title="How often the answer moves to the patched value's prediction (95% CI over problems)",
    )  # fmt: skip
    return Section("Value-matched patching", table, figure, headline, reading, "value_patching.parquet")


# ---------------------------------------------------------------------------------------------- Cywinski templates
#: The problems of ``template:cywinski`` (Cywinski, Bussmann et al. 2025), in their seeded order.
TEMPLATE = load_problems("template:cywinski")
TEMPLATE_SECTION = "Value-matched patching on the Cywinski templates"


def template_unreadable(inputs: ReportInputs) -> str | None:
    """Why the model cannot run the template problems (its tokenizer writes their words as unknown), or None."""
    tokenizer = inputs.model.tokenizer
    ids = tokenizer(TEMPLATE[0].question)["input_ids"]
    unknown = sum(i == tokenizer.unk_token_id for i in ids) if tokenizer.unk_token_id is not None else 0
    if unknown:
        return f"the tokenizer writes {unknown} of the template's {len(ids)} tokens as unknown (a toy vocabulary)"
    return None


def run_template(inputs: ReportInputs, n: int, out: Path) -> list[Section]:
    reading, store = read_thoughts(
        inputs.model,
        TEMPLATE[:n],
        out,
        n_latents=inputs.n_latents,
        max_new_tokens=inputs.max_new_tokens,
        batch_size=inputs.batch_size,
        seed=inputs.seed,
        settings={
            **inputs.settings,
            "data_source": "template:cywinski",
            "report_part": "template",
            "value_groups": "(step1, Z)",
        },
        executor=inputs.executor,
        value_context=shared_with_step,
    )
    summary = write_read_thoughts(reading, out, top_k=5, n_layers=inputs.model.cfg.n_layers)
    store.finish(reading.readout, summary)
    section = value_section(out)
    section.title = TEMPLATE_SECTION
    return [section]


# ---------------------------------------------------------------------------------------------- SAE features
#: Features screened per SAE (the most frequent live ones).
SCREENED_FEATURES = 32


def run_features(inputs: ReportInputs, n: int, out: Path) -> list[Section]:
    saes = dict(inputs.saes or {})
    settings = {**inputs.settings, "report_part": "features", "sites": list(saes), "top_frequent": SCREENED_FEATURES}
    screen, store = screen_features(
        inputs.model,
        saes,
        inputs.problems[:n],
        out,
        top_frequent=SCREENED_FEATURES,
        n_latents=inputs.n_latents,
        max_new_tokens=inputs.max_new_tokens,
        settings=settings,
    )
    summary = write_screen(screen, out)
    store.finish(screen.rows, summary)
    table = pd.read_parquet(out / "summary.parquet")
    columns = ["feature_id", "op", "n", "effect", "low", "high", "cohens_d", "q_value", "significant"]
    shown = table.reindex(table["cohens_d"].abs().sort_values(ascending=False).index)[
        [c for c in columns if c in table.columns]
    ].head(15)
    causal = pd.read_parquet(out / "causal.parquet")
    headline = {f"{r.feature_id}/{r.op}": triplet(r, "effect") for r in shown.itertuples()}
    headline["n_causal"] = len(causal)
    headline["n_tested"] = int(table["p_value"].notna().sum()) if "p_value" in table else len(table)
    per_site = causal.groupby("site").size().to_dict() if len(causal) else {}
    reading = [
        f"{len(causal)} of {headline['n_tested']} tested (feature, edit) cells change the gold answer's log-prob "
        f"at BH q < 0.05 by at least 0.05 nats"
        + (": " + ", ".join(f"{site} {count}" for site, count in per_site.items()) if per_site else "")
        + ".",
        "Ablations are tested where the feature is active; clamps net of the same push along a random direction.",
    ]
    figure = screen_volcano(table) if len(table) else None
    return [Section("Causal SAE features", shown.reset_index(drop=True), figure, headline, reading, "summary.parquet")]


def no_saes(inputs: ReportInputs) -> str | None:
    if not inputs.saes:
        return (
            "no SAEs given: train them with python -m experiments.train_saes --checkpoint CKPT --out DIR (hours on a "
            "real checkpoint; SAEs squeezed into the report's budget would be too small to trust), then pass --saes DIR"
        )
    return None


PARTS.add("accuracy", Part("accuracy", "Accuracy with and without the thoughts", "problems", run_accuracy))
PARTS.add("step_importance", Part("step_importance", "Step importance", "problems", run_step_importance))
PARTS.add("attention", Part("attention", "Attention vs importance", "problems", run_attention))
PARTS.add("patching", Part("patching", "Minimal-pair patching", "pairs", run_patching))
PARTS.add("routes", Part("routes", "Route patching", "pairs", run_routes))
PARTS.add("chained", Part("chained", "Chained vs parallel patching", "pairs", run_chained))
PARTS.add(
    "reading", Part("reading", "Lens, probes, early answers, value patching", "problems", run_reading, minimum=16)
)
PARTS.add("template", Part("template", TEMPLATE_SECTION, "template problems", run_template, 32, template_unreadable))
PARTS.add("features", Part("features", "Causal SAE features", "problems", run_features, 10, no_saes))


def run_part(part: Part, inputs: ReportInputs, n: int, out: Path) -> list[Section]:
    """``part`` on ``n`` units in ``out``; a part with nothing to measure gives one section saying why."""
    out.mkdir(parents=True, exist_ok=True)
    try:
        return part.run(inputs, n, out)
    except NothingToMeasureError as error:
        return [Section(part.title, pd.DataFrame(), None, {"nothing_to_measure": str(error)}, [str(error)])]
