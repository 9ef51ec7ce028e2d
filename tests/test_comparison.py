"""The model comparison's two readings, on tables built by hand."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from codi_lens.patching.routes import EVERY_LAYER
from codi_lens.reports.comparison import recurrence_reading, recurrence_table, storage_reading, storage_table


def _moved(path, rates: dict[tuple[int, int], float]) -> None:
    rows = [{"condition": "different", "step": s, "thought": t, "n": 20, "mean": m, "low": m - 0.1, "high": m + 0.1}
            for (s, t), m in rates.items()]  # fmt: skip
    pd.DataFrame(rows).to_parquet(path, index=False)


def test_storage_names_each_models_thought_and_counts_agreement(tmp_path):
    _moved(tmp_path / "a.parquet", {(1, 1): 0.2, (1, 2): 0.6, (2, 3): 0.7, (2, 4): 0.1})
    _moved(tmp_path / "b.parquet", {(1, 1): 0.1, (1, 2): 0.5, (2, 3): 0.2, (2, 4): 0.4})
    pd.DataFrame({"condition": [], "n": []}).to_parquet(tmp_path / "empty.parquet")  # nothing could be moved
    files = {"A": tmp_path / "a.parquet", "B": tmp_path / "b.parquet", "C": tmp_path / "none"}
    table = storage_table({**files, "D": tmp_path / "empty.parquet"})
    assert table[["model", "step", "thought"]].values.tolist() == [["A", 1, 2], ["A", 2, 3], ["B", 1, 2], ["B", 2, 4]]
    lines = storage_reading(table, ["A", "B"])
    assert "same in every model at 1 of 2 steps" in lines[0]
    assert "step 2: A thought 3 (70% [60%, 80%]), B thought 4 (40% [30%, 50%])" in lines[0]


def _route_rows(differences: dict[str, list[float]]) -> pd.DataFrame:
    rows = []
    for target, values in differences.items():
        for pair, difference in enumerate(values):
            for route, recovery in (("recurrence", 0.5 + difference), ("attention", 0.5)):
                rows.append({"pair_id": pair, "target": target, "thought": int(target[-1]), "route": route,
                             "layer": EVERY_LAYER, "head": np.nan, "donor": "clean", "reason": None,
                             "recovery": recovery})  # fmt: skip
    rows.append({**rows[0], "pair_id": 99, "reason": "clean answered wrong", "recovery": 50.0})  # never used
    return pd.DataFrame(rows)


def test_recurrence_compares_each_step_with_the_first_model(tmp_path):
    first = {"thought 1": [0.1, 0.2, 0.1, 0.2, 0.15, 0.1], "thought 2": [0.0, 0.1, -0.1, 0.0, 0.05, -0.05]}
    second = {"thought 1": [0.8, 0.9, 0.7, 0.85, 0.75, 0.8], "thought 2": [0.0, 0.1, -0.1, 0.05, 0.0, -0.05]}
    _route_rows(first).to_parquet(tmp_path / "a.parquet", index=False)
    _route_rows(second).to_parquet(tmp_path / "b.parquet", index=False)
    table = recurrence_table({"CODI": tmp_path / "a.parquet", "Coconut": tmp_path / "b.parquet"})
    mine = table.set_index(["model", "target"])
    assert mine.loc[("CODI", "thought 1"), "mean"] == pytest.approx(np.mean(first["thought 1"]), abs=1e-12)
    assert mine.loc[("CODI", "thought 1"), "n"] == 6  # the pair with a skip reason is left out
    difference = mine.loc[("Coconut", "thought 1"), "vs_first_mean_difference"]
    assert difference == pytest.approx(np.mean(second["thought 1"]) - np.mean(first["thought 1"]), abs=1e-12)
    assert mine.loc[("Coconut", "thought 1"), "vs_first_low"] > 0
    assert mine.loc[("Coconut", "thought 2"), "vs_first_low"] < 0 < mine.loc[("Coconut", "thought 2"), "vs_first_high"]
    skipped = pd.DataFrame({"pair_id": [0, 1], "reason": ["clean answered wrong"] * 2})  # every pair skipped
    skipped.to_parquet(tmp_path / "c.parquet", index=False)
    with_skipped = recurrence_table({"CODI": tmp_path / "a.parquet", "Random": tmp_path / "c.parquet"})
    assert set(with_skipped["model"]) == {"CODI"} and "vs_first_p" not in with_skipped
    assert "no recurrence to compare" in recurrence_reading(with_skipped, ["CODI", "Random"])[0]
    lines = recurrence_reading(table, ["CODI", "Coconut"])
    assert "Coconut against CODI: more at 1 and less at 0 of 2 steps" in lines[0]
    assert "the largest difference at thought 1" in lines[0]


def test_compare_models_runs_both_loops_on_the_same_problems(tmp_path):
    """The command on the shipped CODI model and its Coconut twin: every section of both models, and each
    model's recurrence numbers equal its own route-patching contrasts."""
    from experiments import compare_models

    out = tmp_path / "compare"
    record = compare_models.main(["--limit", "8", "--parts", "step_importance,routes", "--out", str(out)])
    assert set(record["models"]) == {"toy-chain", "toy-coconut"}
    rows = pd.read_parquet(out / "results.parquet")
    assert set(rows["model"]) == {"toy-chain", "toy-coconut"}
    assert set(rows["section"]) == {"Step importance", "Route patching: recurrence or attention"}
    recurrence = pd.DataFrame(record["recurrence"])
    for model in ("toy-chain", "toy-coconut"):
        own = pd.read_parquet(out / model / "routes" / "contrasts.parquet").set_index("target")
        mine = recurrence[recurrence["model"] == model].set_index("target")
        assert set(mine.index) == set(own.index)
        for target in own.index:
            assert mine.loc[target, "mean"] == pytest.approx(own.loc[target, "mean_difference"], abs=1e-12)
            assert mine.loc[target, "n"] == own.loc[target, "n"]
    assert "Plotly.newPlot" in (out / "comparison.html").read_text()
    assert record["readings"]["What the recurrence carries"][0].startswith("Recurrence minus attention, toy-coconut")
