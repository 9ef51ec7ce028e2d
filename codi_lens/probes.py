"""Linear probes on continuous thoughts: what a (layer, thought) state encodes, held out by problem.

Targets per problem (:func:`probe_labels`): the value of intermediate j (``value:j``), the operation
of step j (``operation:j``: ``+ - * /``, from its calculator span) and whether the model's final answer
is right (``answer_correct``). Each probe is a linear classifier on the
standardised state; its inverse L2 strength ``C`` is chosen on a validation split of the training problems,
and its accuracy is measured on held-out problems, never on the ones it was fitted to.

The probe is scikit-learn's multinomial ``LogisticRegression`` (lbfgs, ``tol=1e-3``, at most 100
iterations), fitted along the ``C`` grid from strong to weak regularisation with each fit warm-started
from the previous one. A ridge classifier would be
closed-form, but one-vs-rest least squares recovered only 84% of a planted 4-class linear signal that
the logistic probe recovers at 92%, so it is not used.

Control task (Hewitt & Liang's selectivity): the same probe trained and scored on labels shuffled
across problems (each split shuffled on its own, seeded). It keeps the label distribution but cuts
the link to the state, so it should sit at chance (the majority-class rate, ``chance``); a probe is
informative as far as it beats its control (``selectivity``).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from jaxtyping import Float
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits
from torch import Tensor
from tqdm.auto import tqdm

from codi_lens.data.problems import CALC_SPAN, Problem
from codi_lens.stats import bootstrap_ci

#: Inverse L2 strengths tried on the validation split.
C_GRID = (0.01, 0.1, 1.0, 10.0)
OPERATOR = re.compile(r"//|[+\-*/]")


def step_operations(problem: Problem) -> list[str]:
    """The operator of each calculator span (``"+"``, ``"-"``, ``"*"``, ``"/"``, ``"//"``); a span with
    several different operators is ``"mixed"``, one with none ``"none"``."""
    operations = []
    for span in CALC_SPAN.findall(problem.solution):
        found = set(OPERATOR.findall(span.rsplit("=", 1)[0].strip().lstrip("-")))
        operations.append(found.pop() if len(found) == 1 else ("none" if not found else "mixed"))
    return operations


def probe_labels(problems: Sequence[Problem], correct: Sequence[bool]) -> pd.DataFrame:
    """One row per (problem, target) with its ``label`` (a string): ``value:j`` and ``operation:j`` for
    every step j of the problem, and ``answer_correct``. ``index`` is the problem's row in ``problems``."""
    rows = []
    for index, (problem, right) in enumerate(zip(problems, correct)):
        for j, value in enumerate(problem.intermediates, start=1):
            rows.append({"index": index, "problem_id": problem.id, "target": f"value:{j}", "label": f"{value:g}"})
        for j, operation in enumerate(step_operations(problem), start=1):
            rows.append({"index": index, "problem_id": problem.id, "target": f"operation:{j}", "label": operation})
        rows.append({"index": index, "problem_id": problem.id, "target": "answer_correct", "label": str(bool(right))})
    return pd.DataFrame(rows)


@dataclass
class ProbeFit:
    """A fitted probe's choice and held-out result: ``C``, validation accuracy, per-test-row hits."""

    C: float
    val_accuracy: float
    test_hits: np.ndarray


def fit_probe(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    *,
    c_grid: Sequence[float] = C_GRID,
) -> ProbeFit:
    """Fit a standardised logistic-regression probe for each ``C``, keep the best on validation, and
    score it on the test rows. A single training class gives the constant probe."""
    classes = np.unique(y_train)
    if len(classes) == 1:
        return ProbeFit(float("nan"), float(np.mean(y_val == classes[0])), y_test == classes[0])
    scaler = StandardScaler().fit(x_train)
    x_train, x_val, x_test = scaler.transform(x_train), scaler.transform(x_val), scaler.transform(x_test)
    # One probe walked along the grid from the strongest regularisation: each fit starts from the last.
    probe = LogisticRegression(max_iter=100, tol=1e-3, warm_start=True)
    best: tuple[float, float, np.ndarray] | None = None
    for c in sorted(c_grid):
        probe.set_params(C=c)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            warnings.filterwarnings("ignore", message="The number of unique classes")  # many values, few problems
            probe.fit(x_train, y_train)
        accuracy = float(np.mean(probe.predict(x_val) == y_val)) if len(y_val) else float("nan")
        if best is None or accuracy > best[1]:
            best = (c, accuracy, probe.predict(x_test) == y_test)
    return ProbeFit(*best)


def _shuffled(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return labels[rng.permutation(len(labels))]


def probe_table(
    residuals: Float[Tensor, "problem layer latent d_model"],
    labels: pd.DataFrame,
    train: Sequence[int],
    val: Sequence[int],
    test: Sequence[int],
    *,
    layers: Sequence[int] | None = None,
    thoughts: Sequence[int] | None = None,
    targets: Sequence[str] | None = None,
    min_train: int = 20,
    c_grid: Sequence[float] = C_GRID,
    seed: int = 0,
    progress: bool = True,
) -> pd.DataFrame:
    """Every probe: one row per (target, layer, thought, task) with ``task`` ``"probe"`` or
    ``"control"`` (shuffled labels), ``accuracy`` on the test problems with a 95% bootstrap CI over them
    (``low``, ``high``), ``chance`` (majority-class rate of the test labels), ``C``, ``val_accuracy``,
    ``n_train`` and ``n_test``. ``train``/``val``/``test`` are row indices of ``residuals`` (disjoint
    problems); a target with fewer than ``min_train`` training problems is left out."""
    if set(train) & set(test) or set(val) & set(test) or set(train) & set(val):
        raise ValueError("train, validation and test problems must be disjoint")
    data = residuals.float().numpy()
    layers = range(data.shape[1]) if layers is None else layers
    thoughts = range(data.shape[2]) if thoughts is None else thoughts
    chosen = labels if targets is None else labels[labels["target"].isin(targets)]
    split_of = {**{i: "train" for i in train}, **{i: "val" for i in val}, **{i: "test" for i in test}}
    chosen = chosen.assign(split=chosen["index"].map(split_of)).dropna(subset=["split"])
    groups = [(t, g) for t, g in chosen.groupby("target", sort=True) if (g["split"] == "train").sum() >= min_train]
    bar = tqdm(total=len(groups) * len(layers) * len(thoughts), desc="probes", disable=not progress)
    with threadpool_limits(limits=1):  # BLAS threads cost ten times the work on these small problems
        rows = _fit_every_probe(data, groups, layers, thoughts, c_grid, seed, bar)
    bar.close()
    columns = ["target", "layer", "thought", "task", "accuracy", "low", "high", "chance", "C", "val_accuracy"]
    return pd.DataFrame(rows, columns=[*columns, "n_train", "n_test"])


def _fit_every_probe(data, groups, layers, thoughts, c_grid, seed, bar) -> list[dict]:
    rows = []
    for target, group in groups:
        parts = {s: group[group["split"] == s] for s in ("train", "val", "test")}
        rng = np.random.default_rng(seed)
        tasks = {
            "probe": {s: p["label"].to_numpy() for s, p in parts.items()},
            "control": {s: _shuffled(p["label"].to_numpy(), rng) for s, p in parts.items()},
        }
        for layer in layers:
            for thought in thoughts:
                x = {s: data[p["index"].to_numpy(), layer, thought] for s, p in parts.items()}
                for task, y in tasks.items():
                    fit = fit_probe(x["train"], y["train"], x["val"], y["val"], x["test"], y["test"], c_grid=c_grid)
                    accuracy, low, high = bootstrap_ci(fit.test_hits.astype(float), n_resamples=1000)
                    majority = pd.Series(y["test"]).value_counts(normalize=True)
                    rows.append(
                        {
                            "target": target,
                            "layer": layer,
                            "thought": thought,
                            "task": task,
                            "accuracy": accuracy,
                            "low": low,
                            "high": high,
                            "chance": float(majority.iloc[0]) if len(majority) else float("nan"),
                            "C": fit.C,
                            "val_accuracy": fit.val_accuracy,
                            "n_train": len(y["train"]),
                            "n_test": len(y["test"]),
                        }
                    )
                bar.update(1)
    return rows


def cells_chosen_on_validation(table: pd.DataFrame) -> pd.DataFrame:
    """The (target, layer, thought) cell reported per target of :func:`probe_table`'s ``table``: the one whose
    probe has the best validation accuracy, so that the test accuracy it reports is not the one it was
    chosen on."""
    probe = table[table["task"] == "probe"]
    return probe.sort_values("val_accuracy").groupby("target").tail(1)[["target", "layer", "thought"]]


def selectivity(table: pd.DataFrame) -> pd.DataFrame:
    """Per (target, layer, thought): probe accuracy, control accuracy, chance and their difference."""
    if table.empty:
        return pd.DataFrame(columns=["target", "layer", "thought", "control", "probe", "chance", "selectivity"])
    wide = table.pivot_table(index=["target", "layer", "thought"], columns="task", values="accuracy").reset_index()
    chance = table.groupby(["target", "layer", "thought"])["chance"].first().reset_index()
    wide = wide.merge(chance, on=["target", "layer", "thought"])
    wide["selectivity"] = wide["probe"] - wide["control"]
    return wide
