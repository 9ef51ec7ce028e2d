"""How reports write numbers into ``summary.json``: an estimate with its CI as ``[estimate, low, high]``."""

from __future__ import annotations


def with_ci(row: object, name: str, digits: int = 4) -> list[float]:
    """``[estimate, low, high]`` of the columns ``name``, ``name_low`` and ``name_high`` of a table row."""
    return [
        round(getattr(row, name), digits),
        round(getattr(row, f"{name}_low"), digits),
        round(getattr(row, f"{name}_high"), digits),
    ]


def ci_triplet(mean: float, low: float, high: float, digits: int = 4) -> list[float]:
    """``[mean, low, high]`` rounded."""
    return [round(mean, digits), round(low, digits), round(high, digits)]
