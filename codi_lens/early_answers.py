"""Early answers: what the model answers after only k of its n continuous thoughts.

Decoding "after thought k" feeds EOT right after thought k: that is exactly the CODI loop with
``n_latents = k`` (``[question, BOT, z_1..z_k, EOT, answer...]``), so each row is a real run of the
loop, not a read-out. ``k = 0`` feeds EOT straight after BOT.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from codi_lens.core.model import CODIModel
from codi_lens.data.problems import Problem
from codi_lens.run.store import UNIT_COLUMN


def early_answer_rows(
    model: CODIModel,
    problems: Sequence[Problem],
    *,
    n_latents: int = 6,
    max_new_tokens: int = 256,
) -> pd.DataFrame:
    """One row per (problem, k) for k = 0..n_latents: ``problem_id, n_steps, k, prediction, correct,
    answer_text`` (greedy, upstream's budget by default)."""
    questions = [p.question for p in problems]
    rows = []
    for k in range(n_latents + 1):
        result = model.run_codi(questions, n_latents=k, max_new_tokens=max_new_tokens)
        for problem, prediction, text in zip(problems, result.prediction, result.answer_text):
            rows.append(
                {
                    UNIT_COLUMN: problem.id,
                    "problem_id": problem.id,
                    "n_steps": problem.n_steps,
                    "k": k,
                    "prediction": prediction,
                    "correct": prediction is not None and float(prediction) == float(problem.gold),
                    "answer_text": text,
                }
            )
    return pd.DataFrame(rows)
