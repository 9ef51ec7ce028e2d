"""Accuracy of a CODI checkpoint on GSM8K-format problems under conditions (the loop, an intervention in it,
the teacher's explicit chain), resumable, with bootstrap CIs over problems (:func:`accuracy_table`).

``python -m experiments.evaluate`` runs it from the command line.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pandas as pd

from codi_lens.core.answers import is_correct
from codi_lens.core.hooks import HookFn
from codi_lens.core.model import CODIModel
from codi_lens.core.results import CODIResult
from codi_lens.data.problems import Problem, problems_fingerprint
from codi_lens.run.executors import Executor
from codi_lens.run.store import UNIT_COLUMN, ResultStore
from codi_lens.stats import bootstrap_ci


@dataclass
class Condition:
    """One way of answering problems: a model, a mode and (optionally) an intervention.

    Attributes:
        name: label of the condition's rows (``condition`` column).
        model: the model that answers.
        mode: ``"latents"`` (the CODI loop) or ``"explicit"`` (teacher mode: plain decoding).
        n_latents, max_new_tokens: loop length and answer budget.
        fwd_hooks: an intervention (``(name, fn)`` pairs) applied in the loop.
        intervention: a description of ``fwd_hooks`` recorded in ``run.json`` (required with hooks:
            functions cannot be compared across runs, their description can).
    """

    name: str
    model: CODIModel
    mode: Literal["latents", "explicit"] = "latents"
    n_latents: int = 6
    max_new_tokens: int = 256
    fwd_hooks: Sequence[tuple[str, HookFn]] = field(default_factory=tuple)
    intervention: str | None = None

    def __post_init__(self) -> None:
        if self.fwd_hooks and not self.intervention:
            raise ValueError(f"condition {self.name!r} has hooks but no intervention description for run.json")

    def settings(self) -> dict[str, Any]:
        return {
            "checkpoint_sha256": self.model.checkpoint_sha256,
            "mode": self.mode,
            "n_latents": self.n_latents if self.mode == "latents" else None,
            "max_new_tokens": self.max_new_tokens,
            "intervention": self.intervention,
        }

    def answer(self, questions: list[str]) -> CODIResult:
        if self.mode == "explicit":
            return self.model.generate_explicit(questions, max_new_tokens=self.max_new_tokens)
        return self.model.run_codi(
            questions, n_latents=self.n_latents, max_new_tokens=self.max_new_tokens, fwd_hooks=self.fwd_hooks
        )


def unit_id(condition: Condition, problem: Problem) -> str:
    """The unit of work of one problem under one condition: ``"{condition}/{problem id}"``."""
    return f"{condition.name}/{problem.id}"


def answer_rows(condition: Condition, problems: list[Problem]) -> pd.DataFrame:
    """Answer ``problems`` under ``condition``: one row per problem, scored with upstream's rule."""
    result = condition.answer([p.question for p in problems])
    return pd.DataFrame(
        {
            UNIT_COLUMN: [unit_id(condition, p) for p in problems],
            "problem_id": [p.id for p in problems],
            "condition": condition.name,
            "source": [p.source for p in problems],
            "split": [p.split for p in problems],
            "index": [p.index for p in problems],
            "n_steps": [p.n_steps for p in problems],
            "gold": [p.gold for p in problems],
            "prediction": [float("nan") if x is None else x for x in result.prediction],  # NaN: no number
            "correct": [is_correct(pred, p.gold) for pred, p in zip(result.prediction, problems)],
            "answer_text": result.answer_text,
            "n_answer_tokens": [len(a) for a in result.answer_tokens],
        }
    )


def evaluate_conditions(
    conditions: Sequence[Condition],
    problems: list[Problem],
    out: str | Path,
    *,
    batch_size: int = 8,
    settings: dict[str, Any] | None = None,
    overwrite: bool = False,
    progress: bool = True,
    executor: Executor | None = None,
) -> tuple[pd.DataFrame, ResultStore]:
    """Answer every problem under every condition into one resumable folder; rows in condition order.

    ``run.json`` records each condition's settings, the problems' fingerprint and ``settings``.
    ``executor``: where batches run (default here; :class:`~codi_lens.run.executors.RayExecutor`: Ray tasks).
    """
    names = [c.name for c in conditions]
    if len(set(names)) != len(names):
        raise ValueError(f"condition names must be unique: {names}")
    store = ResultStore(
        out,
        {
            **(settings or {}),
            "data": problems_fingerprint(problems),
            "n_problems": len(problems),
            "conditions": {c.name: c.settings() for c in conditions},
        },
        overwrite=overwrite,
    )
    frames = []
    for condition in conditions:
        frames.append(
            store.run(
                problems,
                lambda batch, c=condition: answer_rows(c, batch),
                unit_id=lambda p, c=condition: unit_id(c, p),
                batch_size=batch_size,
                desc=f"{condition.name}",
                progress=progress,
                executor=executor,
                unit="problem",
                model=condition.model,
            )
        )
    return pd.concat(frames, ignore_index=True), store


def accuracy_table(predictions: pd.DataFrame, by: str = "n_steps") -> pd.DataFrame:
    """Accuracy per condition, overall and per ``by`` value, with its 95% bootstrap CI over problems.

    ``predictions`` needs columns ``condition``, ``correct`` and ``by``. Returns one row per
    (condition, group) with ``n``, ``n_correct``, ``accuracy`` and its CI (``low``, ``high``; see
    :func:`bootstrap_ci`); the overall row has group "all".
    """

    def row(condition, group: str, part: pd.DataFrame) -> dict:
        accuracy, low, high = bootstrap_ci(part["correct"].to_numpy(dtype=float))
        counts = {"n": len(part), "n_correct": int(part["correct"].sum())}
        return {"condition": condition, "group": group, **counts, "accuracy": accuracy, "low": low, "high": high}

    overall = [row(condition, "all", part) for condition, part in predictions.groupby("condition")]
    grouped = [row(condition, str(key), part) for (condition, key), part in predictions.groupby(["condition", by])]
    return pd.DataFrame(overall + grouped)
