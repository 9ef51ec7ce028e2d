"""Reports of clean/corrupted pairs: the pairs with every rejected candidate, or a check of pairs made elsewhere."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from codi_lens.data.pairs import checked_pair_table


def write_pairs(pairs: pd.DataFrame, rejections: pd.DataFrame, out: str | Path) -> dict[str, Any]:
    """``pairs.parquet`` and ``rejections.parquet`` (every candidate rejected, with its reason); returns the
    counts: pairs, problems without a pair by their first candidate's reason, candidates by reason."""
    out = Path(out)
    pairs.to_parquet(out / "pairs.parquet", index=False)
    rejections.to_parquet(out / "rejections.parquet", index=False)
    without = rejections[~rejections["has_pair"]].drop_duplicates("problem_id")
    return {
        "n_pairs": len(pairs),
        "problems_without_pair_by_first_reason": without["reason"].value_counts().to_dict(),
        "rejected_candidates_by_reason": rejections["reason"].value_counts().to_dict(),
    }


def write_import_report(report: pd.DataFrame, out: str | Path) -> dict[str, Any]:
    """``import_report.parquet`` (one row per pair made elsewhere: agrees, disagrees or rejected, with the
    claimed and recomputed answers) and ``pairs.parquet`` (the pairs that agree, as a pair table patching
    reads with ``--pairs``); returns the counts by status and the rejections by reason."""
    report.to_parquet(Path(out) / "import_report.parquet", index=False)
    checked_pair_table(report).to_parquet(Path(out) / "pairs.parquet", index=False)
    rejected = report.loc[report["status"] == "rejected", "reason"].str.split(":").str[0]
    return {
        "n_pairs": len(report),
        "status": report["status"].value_counts().to_dict(),
        "rejected_by_reason": rejected.value_counts().to_dict(),
    }
