"""Accuracy of a CODI checkpoint on GSM8K-format problems, resumable and refusing stale results.

    python -m codi_lens.evaluate [--checkpoint toy-chain] [--data toy-chain:test] [--limit N] [--out DIR]

Writes to ``--out`` (default ``results/evaluate``): ``run.json`` (checkpoint content hash, data
fingerprint, budget, ...), ``parts/`` (predictions as each batch finishes), ``results.parquet``
(one row per problem) and ``summary.json``. Rerunning the same command after a kill continues where
it stopped; rerunning with another checkpoint, data or budget into the same folder is refused (use
``--overwrite`` or another ``--out``). The last line printed is ``accuracy: X/N``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pandas as pd

from codi_lens.answers import is_correct
from codi_lens.cli import add_common_args, executor_from_args, load_model, model_settings, parse_common_args, run_main
from codi_lens.data import Problem, load_problems, problems_fingerprint
from codi_lens.distributed import Executor
from codi_lens.model import CODIModel
from codi_lens.runner import UNIT_COLUMN, ResultStore


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
    fwd_hooks: Sequence[tuple] = field(default_factory=tuple)
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

    def answer(self, questions: list[str]):
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
    ``executor``: where batches run (default here; :class:`~codi_lens.distributed.RayExecutor`: Ray tasks).
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
            )
        )
    return pd.concat(frames, ignore_index=True), store


def evaluate(
    condition: Condition,
    problems: list[Problem],
    out: str | Path,
    *,
    batch_size: int = 8,
    settings: dict[str, Any] | None = None,
    overwrite: bool = False,
    progress: bool = True,
    executor: Executor | None = None,
) -> pd.DataFrame:
    """Answer every problem under one condition (resumable); writes ``results.parquet`` and returns it."""
    table, store = evaluate_conditions(
        [condition],
        problems,
        out,
        batch_size=batch_size,
        settings=settings,
        overwrite=overwrite,
        progress=progress,
        executor=executor,
    )
    store.finish(table)
    return table


def main(argv: list[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, out="results/evaluate", batch_size=8)
    parser.add_argument("--n-latents", type=int, default=6, help="continuous thoughts fed back (CODI: 6)")
    args = parse_common_args(parser, argv)

    started = time.perf_counter()
    model = load_model(args)
    problems = load_problems(args.data, split=args.split, limit=args.limit)
    condition = Condition("latents", model, n_latents=args.n_latents, max_new_tokens=args.max_new_tokens)
    settings = {**model_settings(model, args), "data_source": args.data, "limit": args.limit}
    table, store = evaluate_conditions(
        [condition],
        problems,
        args.out,
        batch_size=args.batch_size,
        settings=settings,
        overwrite=args.overwrite,
        executor=executor_from_args(args),
    )
    n_correct = int(table["correct"].sum())
    store.finish(
        table,
        {
            "n_problems": len(table),
            "n_correct": n_correct,
            "accuracy": n_correct / max(1, len(table)),
            "wall_seconds_this_invocation": round(time.perf_counter() - started, 1),
        },
    )
    print(f"accuracy: {n_correct}/{len(table)}")
    return table


if __name__ == "__main__":
    run_main(main)
