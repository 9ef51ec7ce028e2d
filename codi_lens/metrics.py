"""Metrics over tidy result frames."""

from __future__ import annotations

import pandas as pd


def accuracy_table(predictions: pd.DataFrame, by: str = "n_steps") -> pd.DataFrame:
    """Accuracy per condition, overall and per ``by`` value.

    ``predictions`` needs columns ``condition``, ``correct`` and ``by``. Returns one row per
    (condition, group) with ``n``, ``n_correct`` and ``accuracy``; the overall row has group "all".
    """
    grouped = predictions.groupby(["condition", by])["correct"].agg(n="size", n_correct="sum").reset_index()
    grouped = grouped.rename(columns={by: "group"})
    grouped["group"] = grouped["group"].astype(str)
    overall = predictions.groupby("condition")["correct"].agg(n="size", n_correct="sum").reset_index()
    overall["group"] = "all"
    table = pd.concat([overall, grouped], ignore_index=True)
    table["accuracy"] = table["n_correct"] / table["n"]
    return table[["condition", "group", "n", "n_correct", "accuracy"]]
