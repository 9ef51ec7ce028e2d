"""What a command does when every unit of work was skipped: write what it knows, then stop in one line.

A skipped unit (a pair whose clean question the model answers wrong, a problem without an answer number,
...) is a row with a non-empty ``reason``. When no unit is left to measure, the command still writes
``results.parquet`` (the skipped rows) and ``summary.json`` (the counts by reason), and raises
:class:`NothingToMeasureError`, which the command line prints as one ``error:`` line with those counts
and a non-zero exit status.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pandas as pd

from codi_lens.core.errors import CodiLensError

if TYPE_CHECKING:
    from codi_lens.run.store import ResultStore


class NothingToMeasureError(CodiLensError):
    """Every unit of a run was skipped; the message gives how many and why."""


def skipped_by_reason(rows: pd.DataFrame, unit_column: str) -> dict[str, int]:
    """How many units were skipped, by reason (one count per unit, whatever its number of rows)."""
    if "reason" not in rows or rows.empty:
        return {}
    skipped = rows[rows["reason"].fillna("") != ""].drop_duplicates(unit_column)
    return {str(k): int(v) for k, v in skipped["reason"].value_counts().items()}


def measured_units(rows: pd.DataFrame, unit_column: str) -> int:
    """How many units have at least one measured row (no skip ``reason``)."""
    if rows.empty:
        return 0
    if "reason" not in rows:
        return int(rows[unit_column].nunique())
    return int(rows.loc[rows["reason"].fillna("") == "", unit_column].nunique())


def counts_text(counts: dict[str, int]) -> str:
    """``{"reason a": 3, "reason b": 1}`` as ``3 reason a; 1 reason b`` (``no reason recorded`` when empty)."""
    return "; ".join(f"{n} {reason}" for reason, n in counts.items()) or "no reason recorded"


def stop_if_nothing_measured(
    rows: pd.DataFrame, store: ResultStore, *, unit_column: str, noun: str, extra: dict[str, Any] | None = None
) -> None:
    """Return when any unit was measured; else finish ``store`` with the skipped rows as ``results.parquet``
    and ``summary.json`` (``n_<noun>``, ``n_<noun>_used`` = 0, ``skipped_by_reason``, ``nothing_to_measure``
    and ``extra``) and raise :class:`NothingToMeasureError` with the counts."""
    if measured_units(rows, unit_column):
        return
    counts = skipped_by_reason(rows, unit_column)
    total = int(rows[unit_column].nunique()) if len(rows) else 0
    summary = {
        f"n_{noun}": total,
        f"n_{noun}_used": 0,
        "skipped_by_reason": counts,
        "nothing_to_measure": True,
        **(extra or {}),
    }
    store.finish(rows, summary)
    raise NothingToMeasureError(
        f"nothing left to measure: all {total} {noun} were skipped ({counts_text(counts)}); "
        f"counts in {store.directory / 'summary.json'}"
    )
