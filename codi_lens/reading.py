"""What do the thoughts hold? The reading pipeline: lenses, probes, early answers and value-matched patching on
one split of problems, each stage resumable.

The problems are split by id (seeded, :func:`split_problems`) into *fit* problems, which train the tuned lens
and the probes and give the reference thoughts of value-matched patching, and *eval* problems, on which
everything is measured. Stages (:func:`read_thoughts`):

1. the thought states of every problem (:func:`codi_lens.lens.thought_states`);
2. the tuned lens, trained on the fit problems and saved in ``OUT/tuned_lens`` (reused when there);
3. readout (:mod:`codi_lens.lens`): where every intermediate value and the answer rank at each (layer,
   thought) under both lenses, against another problem's values (resumable in ``OUT``), and the top decodes;
4. probes (:mod:`codi_lens.probes`): value and operation of step j, and whether the answer is right, with a
   shuffled-label control;
5. early answers (:mod:`codi_lens.early_answers`), resumable in ``OUT/early_answers``;
6. value-matched patching (:mod:`codi_lens.value_patching`), resumable in ``OUT/value_patching``.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from codi_lens.core.model import CODIModel
from codi_lens.data.problems import DataError, Problem
from codi_lens.early_answers import early_answer_rows
from codi_lens.lens import (
    TUNED_LENS_CONFIG,
    ThoughtStates,
    TunedLens,
    readout_frame,
    readout_targets,
    single_token_values,
    thought_states,
    top_decodes,
    train_tuned_lens,
)
from codi_lens.probes import probe_labels, probe_table
from codi_lens.run.executors import Executor
from codi_lens.run.store import UNIT_COLUMN, ResultStore
from codi_lens.value_patching import Context, ValueMeans, no_context, value_patching_rows


def split_problems(problems: list[Problem], fit_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Row indices of the fit and eval problems: ordered by a seeded hash of the id, so a problem's side
    does not depend on which others are in the set's order."""
    if not 0 < fit_fraction < 1:
        raise ValueError(f"the fit fraction must be between 0 and 1, got {fit_fraction}")
    order = sorted(range(len(problems)), key=lambda i: zlib.crc32(f"{seed}:{problems[i].id}".encode()))
    n_fit = round(fit_fraction * len(problems))
    if n_fit < 4 or len(problems) - n_fit < 2:
        raise DataError(f"{len(problems)} problems are too few to split into fit and eval problems")
    return sorted(order[:n_fit]), sorted(order[n_fit:])


def tuned_lens_for(
    model: CODIModel, states: ThoughtStates, fit: list[int], directory: Path, *, steps: int, seed: int
) -> TunedLens:
    """The lens saved in ``directory`` by an earlier run, or one freshly trained on the fit problems and saved."""
    if (directory / TUNED_LENS_CONFIG).exists():
        return TunedLens.load(directory, model)
    lens = train_tuned_lens(model, states.residuals[fit], steps=steps, seed=seed)
    lens.save(directory, checkpoint_sha256=model.checkpoint_sha256, steps=steps, seed=seed)
    return lens


@dataclass
class Reading:
    """Everything :func:`read_thoughts` measured.

    Attributes:
        states: the thought states of every problem; ``fit`` / ``evaluated``: row indices of the two sides.
        readout: one row per eval problem x value x control x lens x layer x thought (the rank).
        decodes: the top-k tokens at every layer x thought of the eval problems, each lens.
        probes: held-out probe accuracies with their controls.
        early: one row per eval problem x k (the answer with EOT fed after thought k).
        patched: one row per eval problem x thought x step x condition of value-matched patching.
        n_values, n_single_token_values: intermediate values read out, and those written as one token.
    """

    states: ThoughtStates
    fit: list[int]
    evaluated: list[int]
    readout: pd.DataFrame
    decodes: pd.DataFrame
    probes: pd.DataFrame
    early: pd.DataFrame
    patched: pd.DataFrame
    n_values: int
    n_single_token_values: int


def read_thoughts(
    model: CODIModel,
    problems: list[Problem],
    out: str | Path,
    *,
    n_latents: int = 6,
    fit_fraction: float = 0.5,
    top_k: int = 5,
    tuned_lens_steps: int = 500,
    patch_thoughts: Sequence[int] | None = None,
    min_references: int = 3,
    value_context: Context = no_context,
    max_new_tokens: int = 256,
    batch_size: int = 64,
    seed: int = 0,
    settings: dict[str, Any] | None = None,
    overwrite: bool = False,
    executor: Executor | None = None,
) -> tuple[Reading, ResultStore]:
    """Run every stage of the module docstring on ``problems`` into ``out`` (resumable). Returns what was
    measured and the readout's store (``finish`` it with the readout rows). ``value_context``: what value
    patching's reference groups share besides the value (:data:`codi_lens.value_patching.Context`)."""
    out = Path(out)
    fit, evaluated = split_problems(problems, fit_fraction, seed)
    patch_thoughts = list(patch_thoughts or range(1, n_latents + 1))
    store = ResultStore(out, settings or {}, overwrite=overwrite)
    states = thought_states(model, problems, n_latents=n_latents, max_new_tokens=max_new_tokens, batch_size=batch_size)
    lenses = {
        "logit": None,
        "tuned": tuned_lens_for(model, states, fit, out / "tuned_lens", steps=tuned_lens_steps, seed=seed),
    }
    eval_problems = [problems[i] for i in evaluated]
    # The control pairing is drawn once over every eval problem, so a resumed run pairs alike.
    targets = readout_targets(eval_problems, seed=seed)
    targets["reader"] = np.asarray(evaluated)[targets["reader"].to_numpy()]

    def readout_work(batch: list[Problem]) -> pd.DataFrame:
        frame = readout_frame(
            model, states.residuals, targets[targets["problem_id"].isin({p.id for p in batch})], lenses
        )
        return frame.assign(**{UNIT_COLUMN: frame["problem_id"]})

    def run(folder: ResultStore, work, desc: str) -> pd.DataFrame:
        return folder.run(
            eval_problems,
            work,
            unit_id=lambda p: p.id,
            batch_size=batch_size,
            desc=desc,
            executor=executor,
            unit="problem",
            model=model,
        )

    readout = run(store, readout_work, "readout").drop(columns=UNIT_COLUMN)
    eval_ids = [p.id for p in eval_problems]
    decodes = pd.concat(
        [
            top_decodes(model, states.residuals[evaluated], eval_ids, lens, k=top_k, lens_name=name)
            for name, lens in lenses.items()
        ],
        ignore_index=True,
    )
    n_val = max(1, len(fit) // 4)  # the fit problems' last quarter chooses the probes' strength
    probes = probe_table(
        states.residuals, probe_labels(problems, states.correct), fit[:-n_val], fit[-n_val:], evaluated, seed=seed
    )
    early_store = ResultStore(out / "early_answers", settings or {}, overwrite=overwrite)
    early = run(
        early_store,
        lambda b: early_answer_rows(model, b, n_latents=n_latents, max_new_tokens=max_new_tokens),
        "early answers",
    )
    early_store.finish(early)
    means = ValueMeans.from_reference([problems[i] for i in fit], states.thought_embeds[fit], value_context)
    patch_store = ResultStore(out / "value_patching", settings or {}, overwrite=overwrite)

    def patch_work(batch: list[Problem]) -> pd.DataFrame:
        return value_patching_rows(
            model,
            batch,
            means,
            thoughts=patch_thoughts,
            n_latents=n_latents,
            max_new_tokens=max_new_tokens,
            min_count=min_references,
            seed=seed,
        )

    patched = run(patch_store, patch_work, "value patching")
    patch_store.finish(patched)
    reading = Reading(
        states=states,
        fit=fit,
        evaluated=evaluated,
        readout=readout,
        decodes=decodes,
        probes=probes,
        early=early,
        patched=patched,
        n_values=int((~targets["control"]).sum()),
        n_single_token_values=int((~single_token_values(model, targets)["control"]).sum()),
    )
    return reading, store
