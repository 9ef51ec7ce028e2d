"""Two or more checkpoints (any latent loop: CODI, Coconut) through the same report parts on the same problems and
pairs, side by side (``python -m experiments.compare_models``).

Each model runs the parts of :mod:`codi_lens.reports.battery` in ``OUT/<model>/<part>/`` (resumable, as the report's
parts are). Every section the parts write is then shown once, with each model's values in its own colour and
their 95% CIs, each model's generated reading, and the table of all of them. Two comparisons answer the questions
one asks of two loops:

- **where the running value is stored** (:func:`storage_table`): from value-matched patching, for every step the
  thought at which another value's mean thought moves the answer to that value's prediction most, per model;
- **how much the recurrence carries** (:func:`recurrence_table`): from route patching, per step, the recovery
  through the fed thought minus through attention to the earlier positions, per model, and each model's minus the
  first model's (a bootstrap CI over pairs, each model on the pairs it answers right; a permutation p-value,
  Benjamini-Hochberg across steps).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go

from codi_lens.core.model import CODIModel
from codi_lens.data.problems import Problem
from codi_lens.plotting import write_page
from codi_lens.plotting.base import TEMPLATE, ci_bars
from codi_lens.reports.battery import PARTS, ReportInputs, Section, ci_text, run_part
from codi_lens.reports.patching import route_pairs
from codi_lens.run.executors import Executor
from codi_lens.stats import benjamini_hochberg, bootstrap_ci, two_sample_difference

#: The parts compared by default: which thoughts matter, the patching map, what the thoughts hold (lens, probes,
#: early answers, value-matched patching) and the routes a step's content takes.
COMPARED_PARTS = ("step_importance", "patching", "reading", "routes")


@dataclass(frozen=True)
class ComparedModel:
    """A checkpoint in the comparison: the name it is shown under, the model, its result-changing settings."""

    name: str
    model: CODIModel
    settings: dict[str, Any]

    @property
    def folder(self) -> str:
        """The model's folder under the comparison's output (its name with anything but ``[\\w.-]`` as ``_``)."""
        return re.sub(r"[^\w.-]+", "_", self.name)


@dataclass(frozen=True)
class FigureSpec:
    """How a section's table is drawn side by side: rows kept, the x axis, the value and its CI columns."""

    keep: Any  # table -> boolean mask
    x: Any  # str, or table -> Series
    value: str
    low: str
    high: str


#: Sections drawn as grouped bars with CIs (others show their tables only).
FIGURES: dict[str, FigureSpec] = {
    "Step importance": FigureSpec(
        lambda t: (t["intervention"] == "zero") & (t["scope"] == "single"),
        "thought", "importance", "importance_low", "importance_high",
    ),
    "Logit and tuned lens readout": FigureSpec(
        lambda t: (t["lens"] == "logit") & (t["k"] == t["k"].min()) & ~t["control"], "step", "rate", "low", "high"
    ),
    "Linear probes": FigureSpec(lambda t: t["task"] == "probe", "target", "accuracy", "low", "high"),
    "Early answers": FigureSpec(lambda t: t["k"] >= 0, "k", "mean", "low", "high"),
    "Value-matched patching": FigureSpec(
        lambda t: t["measure"] == "moved",
        lambda t: "step " + t["step"].astype(int).astype(str) + ", thought " + t["thought"].astype(int).astype(str),
        "mean", "low", "high",
    ),
    "Route patching: recurrence or attention": FigureSpec(
        lambda t: t["target"].notna(), "target", "mean_difference", "low", "high"
    ),
}  # fmt: skip


def compare_models(
    compared: Sequence[ComparedModel],
    problems: list[Problem],
    pairs: pd.DataFrame,
    out: str | Path,
    *,
    executor: Executor,
    limit: int,
    parts: Sequence[str] = COMPARED_PARTS,
    batch_size: int = 16,
    max_new_tokens: int = 64,
    seed: int = 0,
) -> dict[str, Any]:
    """Run ``parts`` for every model on the first ``limit`` problems or pairs, then write ``comparison.html`` (a
    side-by-side figure, the readings and the table per section, then the storage and recurrence comparisons),
    ``summary.json`` (the readings and both comparisons) and ``results.parquet`` (every section's rows, with a
    ``model`` column). Returns what ``summary.json`` holds."""
    if len(compared) < 2:
        raise ValueError("compare at least two models")
    out = Path(out)
    sections: dict[str, list[Section]] = {}
    for entry in compared:
        inputs = ReportInputs(
            entry.model, problems, pairs, entry.settings, executor,
            n_latents=entry.model.latent_loop.n_latents, max_new_tokens=max_new_tokens, batch_size=batch_size,
            seed=seed,
        )  # fmt: skip
        sections[entry.name] = []
        for name in parts:
            part = PARTS[name]
            n = min(limit, inputs.units(part.unit))
            sections[entry.name] += run_part(part, inputs, n, out / entry.folder / name)
    names = [c.name for c in compared]
    page, readings, tables = side_by_side(sections, names)
    storage = storage_table({c.name: out / c.folder / "reading" / "value_patching_moved.parquet" for c in compared})
    recurrence = recurrence_table({c.name: out / c.folder / "routes" / "results.parquet" for c in compared})
    comparisons = {
        "Where each step's value is stored": (storage, storage_reading(storage, names), storage_figure(storage)),
        "What the recurrence carries": (recurrence, recurrence_reading(recurrence, names), None),
    }
    for title, (table, lines, figure) in comparisons.items():
        page.append((title, [*([figure] if figure is not None else []), *lines, table]))
        readings[title] = lines
    write_page(" vs ".join(names), page, out / "comparison.html")
    pd.concat(tables, ignore_index=True).to_parquet(out / "results.parquet", index=False)
    record = {
        "models": {c.name: str(c.settings.get("checkpoint_sha256")) for c in compared},
        "readings": readings,
        "storage": storage.assign(step="step " + storage["step"].astype(str)).to_dict("records"),
        "recurrence": recurrence.to_dict("records"),
    }
    (out / "summary.json").write_text(json.dumps(record, indent=2, default=str))
    return record


def side_by_side(
    sections: dict[str, list[Section]], names: list[str]
) -> tuple[list[tuple[str, list]], dict[str, list[str]], list[pd.DataFrame]]:
    """Per section title (in the first model's order): the figure (:data:`FIGURES`), each model's reading and the
    joined table; the readings by title; and every table with its ``model`` and ``section``."""
    page, readings, tables = [], {}, []
    by_title = {name: {s.title: s for s in sections[name]} for name in names}
    for title in by_title[names[0]]:
        present = {name: by_title[name][title] for name in names if title in by_title[name]}
        joined = pd.concat(
            [s.table.assign(model=name) for name, s in present.items() if len(s.table)], ignore_index=True
        ) if any(len(s.table) for s in present.values()) else pd.DataFrame()  # fmt: skip
        lines = [f"{name}: {' '.join(line for line in s.reading if line)}" for name, s in present.items()]
        readings[title] = lines
        figure = grouped_figure(title, joined)
        page.append((title, [*([figure] if figure is not None else []), *lines, joined]))
        if len(joined):
            tables.append(joined.assign(section=title))
    return page, readings, tables


def grouped_figure(title: str, joined: pd.DataFrame) -> go.Figure | None:
    """The models' values of one section as grouped bars with 95% CIs (None without a spec or rows)."""
    spec = FIGURES.get(title)
    if spec is None or joined.empty:
        return None
    shown = joined[spec.keep(joined)].copy()
    if shown.empty:
        return None
    shown["x"] = spec.x(shown) if callable(spec.x) else shown[spec.x]
    return ci_bars(shown, "x", spec.value, spec.low, spec.high, color="model", title=f"{title} (95% CI)")


def storage_table(moved_files: dict[str, Path]) -> pd.DataFrame:
    """Per model and step: the thought where another value's mean thought moves the answer to that value's
    prediction most (``thought``, the rate and its 95% CI over problems), from value-matched patching's
    ``value_patching_moved.parquet``; a model without it, or with nothing moved to measure, is left out."""
    rows = []
    for name, path in moved_files.items():
        if not path.exists():
            continue
        moved = pd.read_parquet(path)
        if "step" not in moved.columns:  # no value had a prediction to move to
            continue
        for step, group in moved.groupby("step"):
            top = group.sort_values(["mean", "thought"], ascending=[False, True]).iloc[0]
            rows.append(
                {"model": name, "step": int(step), "thought": int(top["thought"]), "n": int(top["n"]),
                 "moved": top["mean"], "low": top["low"], "high": top["high"]}
            )  # fmt: skip
    return pd.DataFrame(rows, columns=["model", "step", "thought", "n", "moved", "low", "high"])


def storage_reading(storage: pd.DataFrame, names: list[str]) -> list[str]:
    """Whether the models store each step's value at the same thought, read from :func:`storage_table`."""
    if storage.empty or storage["model"].nunique() < 2:
        return ["Value-matched patching did not run on every model: no storage to compare.", ""]
    wide = storage.pivot(index="step", columns="model", values="thought").dropna()
    same = wide[wide.nunique(axis=1) == 1]
    cells = storage.set_index(["step", "model"])

    def where(step: int, name: str) -> str:
        cell = cells.loc[(step, name)]
        rate = ci_text([cell["moved"], cell["low"], cell["high"]], percent=True)
        return f"{name} thought {int(cell['thought'])} ({rate})"

    steps = "; ".join(
        f"step {step}: " + ", ".join(where(step, name) for name in names if name in wide) for step in wide.index
    )
    return [
        f"The thought where each step's value moves the answer most is the same in every model at {len(same)} of "
        f"{len(wide)} steps ({steps}).",
        "Each rate with its 95% CI is in the table; where two thoughts' CIs overlap within a model, the choice "
        "between them is not settled by these problems.",
    ]


def recurrence_table(route_files: dict[str, Path]) -> pd.DataFrame:
    """Per step (``target``) and model: recovery through the recurrence minus through attention (mean over the
    model's pairs, 95% CI), and each later model's against the first (``vs_first``: difference, CI, permutation
    ``p`` and its Benjamini-Hochberg ``q`` across steps), from each model's route-patching rows."""
    per_pair: dict[str, dict[str, np.ndarray]] = {}
    for name, path in route_files.items():
        if path.exists():
            rows = pd.read_parquet(path)
            per_pair[name] = {
                target: (wide["recurrence"] - wide["attention"]).to_numpy(dtype=float)
                for (target, _), wide in route_pairs(rows)
            }
    if len(per_pair) < 2:
        return pd.DataFrame()
    names = list(per_pair)
    first = per_pair[names[0]]
    out = []
    for name in names:
        for target, values in per_pair[name].items():
            mean, low, high = bootstrap_ci(values)
            row = {"model": name, "target": target, "n": len(values), "mean": mean, "low": low, "high": high}
            if name != names[0] and target in first:
                versus = two_sample_difference(values, first[target])
                row |= {f"vs_first_{k}": versus[k] for k in ("mean_difference", "low", "high", "p")}
            out.append(row)
    table = pd.DataFrame(out)
    if "vs_first_p" in table:
        tested = table["vs_first_p"].notna()
        table.loc[tested, "vs_first_q"] = benjamini_hochberg(table.loc[tested, "vs_first_p"].to_numpy())[1]
    return table


def recurrence_reading(table: pd.DataFrame, names: list[str]) -> list[str]:
    """Whether a later model's recurrence carries more or less of each step than the first model's."""
    if table.empty or "vs_first_mean_difference" not in table:
        return ["Route patching did not measure two models on the same steps: no recurrence to compare.", ""]
    lines = []
    for name in names[1:]:
        mine = table[(table["model"] == name) & table["vs_first_mean_difference"].notna()]
        more = mine[(mine["vs_first_low"] > 0) & (mine["vs_first_q"] < 0.05)]
        less = mine[(mine["vs_first_high"] < 0) & (mine["vs_first_q"] < 0.05)]
        largest = mine.loc[mine["vs_first_mean_difference"].abs().idxmax()] if len(mine) else None
        detail = (
            f"; the largest difference at {largest['target']}: "
            + ci_text([largest["vs_first_mean_difference"], largest["vs_first_low"], largest["vs_first_high"]])
            if largest is not None
            else ""
        )
        lines.append(
            f"Recurrence minus attention, {name} against {names[0]}: more at {len(more)} and less at {len(less)} "
            f"of {len(mine)} steps (CI excludes zero, BH q < 0.05){detail}."
        )
    lines.append(
        "Positive: the fed thought carries more of the step's effect on the answer than attention to the earlier "
        "positions does."
    )
    return lines


def storage_figure(storage: pd.DataFrame) -> go.Figure | None:
    """Where each step's value is stored, per model (thought against step); None when nothing was measured."""
    if storage.empty:
        return None
    return px.line(
        storage, x="step", y="thought", color="model", markers=True, template=TEMPLATE,
        title="The thought where each step's value moves the answer most (value-matched patching)",
    )  # fmt: skip
