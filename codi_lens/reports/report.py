"""The one-command report: plan the parts of :mod:`codi_lens.reports.battery` within a time budget, run each as
its own resumable sub-run, and write one offline page and ``report.json``.

**Planning** (:func:`plan_report`). With a budget, every part first runs twice in a scratch folder (``pilot/``),
on a batch of units and then on 2-8 batches, as many as about :data:`PILOT_SECONDS` of work
(:func:`pilot_costs`): the two times give its fixed cost and its cost per unit. The time left after the
pilots (less :data:`PAGE_SHARE` for the page) is shared equally between the parts; a part that needs less than
its share for every available unit takes them all and leaves the rest to the others. A part whose minimum does not
fit is skipped with the reason. With ``limit`` instead, every part runs on ``min(limit, available)`` units. The
plan is written to ``plan.json`` before any part runs and is reused by a rerun with the same settings, so a killed
report resumes to the same numbers.

**Running** (:func:`run_report`). Each part runs in ``parts/<name>/`` with result stores keyed by unit, so a rerun
continues where a kill stopped it and a finished part is read back. Before a part starts, the time spent so far
(pilots and finished parts, kept across reruns in ``parts/<name>/part.json``) is checked against the budget; a
part that would overrun is shrunk to what fits, and the shrunk size is written to the plan.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from codi_lens.plotting import write_page
from codi_lens.reports.battery import PARTS, Part, ReportInputs, Section, run_part
from codi_lens.reports.references import reference_table

#: The share of the budget kept for writing the page.
PAGE_SHARE = 0.03


@dataclass
class PlannedPart:
    """One row of the plan: the size chosen, the units available, the cost model and what happened."""

    name: str
    unit: str
    available: int
    n: int
    fixed_s: float | None = None
    per_unit_s: float | None = None
    skipped: str | None = None

    @property
    def estimate_s(self) -> float | None:
        if self.per_unit_s is None or self.skipped:
            return None
        return self.fixed_s + self.per_unit_s * self.n

    def fits(self, seconds: float) -> int:
        """The most units whose estimated time is within ``seconds``."""
        return int(max(0.0, seconds - self.fixed_s) // max(self.per_unit_s, 1e-9))


@dataclass
class Plan:
    parts: list[PlannedPart]
    budget_s: float | None
    pilot_s: float
    settings: dict[str, Any]

    def table(self, actual: dict[str, float] | None = None) -> pd.DataFrame:
        """The plan as a table (estimated and, when given, actual minutes per part)."""
        rows = []
        for p in self.parts:
            estimate = p.estimate_s
            rows.append(
                {
                    "part": p.name,
                    "unit": p.unit,
                    "units": p.n if not p.skipped else 0,
                    "available": p.available,
                    "estimated_min": None if estimate is None else round(estimate / 60, 2),
                    "actual_min": None if not actual or p.name not in actual else round(actual[p.name] / 60, 2),
                    "skipped": p.skipped or "",
                }
            )
        return pd.DataFrame(rows)

    def save(self, path: Path) -> None:
        record = {"settings": self.settings, "budget_s": self.budget_s, "pilot_s": self.pilot_s}
        path.write_text(json.dumps({**record, "parts": [asdict(p) for p in self.parts]}, indent=1, default=str))

    @classmethod
    def load(cls, path: Path) -> Plan:
        record = json.loads(path.read_text())
        return cls(
            [PlannedPart(**p) for p in record["parts"]], record["budget_s"], record["pilot_s"], record["settings"]
        )


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


#: Seconds of work the second pilot run of a cheap part aims for (so its timing is not noise).
PILOT_SECONDS = 10.0


def first_pilot_size(part: Part, inputs: ReportInputs) -> int:
    """A whole batch of units, at least the part's minimum, at most half of what is available."""
    available = inputs.units(part.unit)
    return min(max(part.minimum, inputs.batch_size), max(part.minimum, available // 2))


def pilot_costs(part: Part, inputs: ReportInputs, folder: Path) -> tuple[float, float]:
    """``(fixed seconds, seconds per unit)`` of ``part`` from two timed runs in ``folder``: one batch, then (at
    least twice and at most eight times as many units) about :data:`PILOT_SECONDS` of work, so that a cheap part's
    difference is not timer noise and an expensive part's second run costs at most twice its first."""
    available = inputs.units(part.unit)
    sizes = [first_pilot_size(part, inputs)]
    times = [_timed_run(part, inputs, sizes[0], folder)]
    wanted = math.ceil(sizes[0] * PILOT_SECONDS / max(times[0], 1e-3))
    sizes.append(min(available, max(2 * sizes[0], min(8 * sizes[0], wanted))))
    _say(f"pilot: {part.name}: {sizes[0]} {part.unit} in {times[0]:.1f} s; timing {sizes[1]}")
    times.append(_timed_run(part, inputs, sizes[1], folder))
    slope = (times[1] - times[0]) / max(sizes[1] - sizes[0], 1)
    per_unit = max(slope, 0.1 * times[1] / sizes[1])  # a noisy pilot never makes units free
    return max(0.0, times[1] - per_unit * sizes[1]), per_unit


def _timed_run(part: Part, inputs: ReportInputs, n: int, folder: Path) -> float:
    started = time.perf_counter()
    run_part(part, inputs, n, folder / str(n))
    return time.perf_counter() - started


def share_budget(planned: list[PlannedPart], seconds: float) -> None:
    """Give each part an equal share of ``seconds``; a part that needs less for every unit takes them all and
    leaves the rest to the others; a part whose minimum does not fit is skipped (sets ``n`` and ``skipped``)."""
    active = [p for p in planned if not p.skipped]
    while active:
        share = seconds / len(active)
        whole = [p for p in active if p.fixed_s + p.per_unit_s * p.available <= share]
        if not whole:
            break
        for p in whole:
            p.n = p.available
            seconds -= p.estimate_s
        active = [p for p in active if p not in whole]
    for p in active:
        p.n = min(p.available, p.fits(seconds / len(active)))
        if p.n < PARTS[p.name].minimum:
            minimum = PARTS[p.name].minimum
            p.skipped = (
                f"the budget leaves {seconds / len(active):.0f} s; its minimum ({minimum} {p.unit}) needs "
                f"{p.fixed_s + p.per_unit_s * minimum:.0f} s"
            )


def plan_report(
    parts: list[Part], inputs: ReportInputs, out: Path, *, budget_s: float | None, limit: int | None
) -> Plan:
    """The plan (see the module docstring), reused from ``out/plan.json`` when its settings match."""
    settings = {**inputs.settings, "parts": [p.name for p in parts], "budget_s": budget_s, "limit": limit}
    settings |= {"problems": len(inputs.problems), "pairs": len(inputs.pairs)}
    settings = json.loads(json.dumps(settings, default=str))
    path = out / "plan.json"
    if path.exists():
        saved = Plan.load(path)
        if saved.settings == settings:
            _say(f"plan: reusing {path}")
            return saved
    planned = []
    for part in parts:
        available = inputs.units(part.unit)
        reason = part.unavailable(inputs) or (
            f"{available} {part.unit} available; it needs {part.minimum}" if available < part.minimum else None
        )
        if reason is None and limit is not None and limit < part.minimum:
            reason = f"--limit {limit} is below its minimum ({part.minimum} {part.unit})"
        planned.append(PlannedPart(part.name, part.unit, available, min(available, limit or available), skipped=reason))
    started = time.perf_counter()
    if budget_s is not None:
        for p in planned:
            if not p.skipped:
                p.fixed_s, p.per_unit_s = pilot_costs(PARTS[p.name], inputs, out / "pilot" / p.name)
        pilot_s = time.perf_counter() - started
        share_budget(planned, budget_s * (1 - PAGE_SHARE) - pilot_s)
    else:
        pilot_s = 0.0
    plan = Plan(planned, budget_s, pilot_s, settings)
    out.mkdir(parents=True, exist_ok=True)
    plan.save(path)
    return plan


def _finished(folder: Path, n: int) -> float | None:
    """Seconds a finished part took, when ``folder`` holds a finished run of ``n`` units."""
    record = folder / "part.json"
    if record.exists():
        saved = json.loads(record.read_text())
        if saved.get("n") == n and saved.get("finished"):
            return float(saved["seconds"])
    return None


def start_part(folder: Path, units: list[str]) -> None:
    """Record which units ``folder`` is being filled for; results an earlier plan left there for other units are
    discarded first (said on stderr), since a part's stores are made for one set of units."""
    record = folder / "part.json"
    digest = hashlib.sha256("\n".join(units).encode()).hexdigest()[:16]
    if record.exists() and json.loads(record.read_text()).get("units") != digest:
        _say(f"{folder}: holds results for other problems or pairs; starting it again for these {len(units)}")
        shutil.rmtree(folder)
    if not record.exists():
        folder.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps({"n": len(units), "units": digest, "finished": False}))


def run_report(
    inputs: ReportInputs,
    out: str | Path,
    *,
    parts: list[Part],
    budget_s: float | None = None,
    limit: int | None = None,
    title: str = "CODI report",
    overwrite: bool = False,
) -> dict[str, Any]:
    """Plan, run every part, and write ``report.html`` and ``report.json`` in ``out``; returns the record.
    ``overwrite``: discard an earlier report's plan, pilots and parts in ``out`` first."""
    out = Path(out)
    if overwrite:
        for name in ("plan.json", "pilot", "parts", "report.html", "report.json"):
            path = out / name
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    plan = plan_report(parts, inputs, out, budget_s=budget_s, limit=limit)
    _say("plan:\n" + plan.table().to_string(index=False))
    sections: dict[str, list[Section]] = {}
    actual: dict[str, float] = {}
    for p in plan.parts:
        if p.skipped:
            continue
        folder = out / "parts" / p.name
        spent = plan.pilot_s + sum(actual.values())
        if budget_s is not None and _finished(folder, p.n) is None:
            left = budget_s * (1 - PAGE_SHARE) - spent
            if p.estimate_s > left:
                p.n = min(p.n, p.fits(left))
                if p.n < PARTS[p.name].minimum:
                    p.skipped = f"the budget ran out ({left:.0f} s left)"
                    plan.save(out / "plan.json")
                    continue
                _say(f"{p.name}: shrunk to {p.n} {p.unit} to stay within the budget ({left:.0f} s left)")
                plan.save(out / "plan.json")
        started = time.perf_counter()
        start_part(folder, inputs.unit_ids(p.unit, p.n))
        sections[p.name] = run_part(PARTS[p.name], inputs, p.n, folder)
        seconds = _finished(folder, p.n) or time.perf_counter() - started
        actual[p.name] = seconds
        record = json.loads((folder / "part.json").read_text())
        (folder / "part.json").write_text(json.dumps({**record, "finished": True, "seconds": seconds}))
        _say(f"{p.name}: {p.n} {p.unit} in {seconds / 60:.1f} min (estimated {_minutes(p.estimate_s)})")
    return write_report(plan, sections, actual, out, title=title)


def headline_table(headlines: dict[str, dict[str, Any]]) -> pd.DataFrame:
    """Every headline number as a row: ``section, number, value, low, high`` (no interval: NaN bounds)."""
    rows = []
    for section, numbers in headlines.items():
        for key, value in numbers.items():
            if isinstance(value, list) and len(value) == 3:
                rows.append({"section": section, "number": key, "value": value[0], "low": value[1], "high": value[2]})
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                rows.append({"section": section, "number": key, "value": float(value)})
    return pd.DataFrame(rows, columns=["section", "number", "value", "low", "high"]).astype(
        {"value": float, "low": float, "high": float}
    )


def _minutes(seconds: float | None) -> str:
    return "-" if seconds is None or math.isnan(seconds) else f"{seconds / 60:.1f} min"


def write_report(
    plan: Plan, sections: dict[str, list[Section]], actual: dict[str, float], out: Path, *, title: str
) -> dict[str, Any]:
    """``report.html`` (the plan, the published findings beside ours, one section per part), ``report.json`` and
    ``results.parquet`` (every headline number as a row, :func:`headline_table`)."""
    headlines = {s.title: s.headline for part in sections.values() for s in part}
    references = reference_table(headlines)
    plan_table = plan.table(actual)
    page = [
        (
            "Plan: parts, units, estimated and actual minutes",
            [
                (
                    f"Budget {_minutes(plan.budget_s)}; pilots {_minutes(plan.pilot_s)}; "
                    if plan.budget_s
                    else "No budget: every part on --limit units; "
                )
                + f"parts {_minutes(sum(actual.values()))}. Skipped parts say why.",
                plan_table.astype(object).where(plan_table.notna(), "-"),
            ],
        ),
        ("Published findings beside this checkpoint", [references]),
    ]
    for name, part_sections in sections.items():
        for s in part_sections:
            shown = [*(line for line in s.reading if line)]
            if s.figure is not None:
                shown.append(s.figure)
            if len(s.table):
                shown += [s.table, f"Table: parts/{name}/{s.source}"]
            page.append((s.title, shown))
    write_page(title, page, out / "report.html")
    record = {
        "title": title,
        "settings": plan.settings,
        "plan": plan_table.astype(object).where(plan_table.notna(), None).to_dict(orient="records"),
        "seconds": {"budget": plan.budget_s, "pilots": round(plan.pilot_s, 1), "parts": round(sum(actual.values()), 1)},
        "headlines": headlines,
        "readings": {s.title: s.reading for part in sections.values() for s in part},
        "references": references.to_dict(orient="records"),
    }
    (out / "report.json").write_text(json.dumps(record, indent=1, default=float))
    headline_table(headlines).to_parquet(out / "results.parquet", index=False)
    return record
