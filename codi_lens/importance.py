"""Step importance: which continuous thoughts matter, measured inside the real latent loop.

For each problem, the baseline run (no intervention) gives the prediction and the answer tokens.
Every ablation (intervention x scope x thought) is then generated greedily (is the answer still
right?) and teacher-forced on the baseline's own answer tokens up to the answer number, where
``KL(baseline || ablated)`` is taken at the position predicting the number's first token (see
:mod:`codi_lens.metrics`). Later thoughts are recomputed from the ablated one by the loop itself.
Each ablation branches off the baseline run at the first thought it changes, and ablations are
batched (see :mod:`codi_lens.branching` and ``python -m benchmarks.step_importance``).

Interventions on the fed thought (see :mod:`codi_lens.interventions`):

- ``zero``: a zero vector;
- ``mean``: the mean thought at that step over a reference set of problems;
- ``noise``: the thought plus Gaussian noise of the thought's norm (seeded per problem, so a problem's
  noise does not depend on its batch);
- ``swap``: the thought of another problem (the next one in the problem list) at that step;
- ``shuffle``: the baseline's own thoughts in a seeded shuffled order (all, or thoughts 1..k; a
  single thought cannot be shuffled, so ``shuffle`` has no ``single`` scope and no ``cumulative``
  scope at k = 1).

Scopes: ``single`` (thought k), ``cumulative`` (thoughts 1..k), ``all`` (every thought; ``thought`` 0
in tables).
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import Tensor

from codi_lens.answers import is_correct
from codi_lens.attention import attention_to_thoughts, pattern_hook_names
from codi_lens.branching import Branch, grow_trunk, run_branches
from codi_lens.data import Problem, difficulty_bucket, problems_fingerprint
from codi_lens.distributed import Executor
from codi_lens.interventions import (
    SCOPES,
    Hooks,
    Scope,
    mean_thought_embeds,
    mean_thoughts,
    noise_thoughts,
    shuffle_thoughts,
    swap_thoughts,
    thought_scope,
    zero_thoughts,
)
from codi_lens.metrics import AnswerNumber, find_answer_number, forced_answers, kl_divergence
from codi_lens.model import CODIModel
from codi_lens.runner import UNIT_COLUMN, ResultStore

INTERVENTIONS = ("zero", "mean", "noise", "swap", "shuffle")


@dataclass(frozen=True)
class Ablation:
    """One condition: an intervention over a scope ending at ``thought`` (0 for scope ``all``)."""

    intervention: str
    scope: Scope
    thought: int

    @property
    def name(self) -> str:
        return f"{self.intervention}/{self.scope}/{self.thought}"


def ablation_grid(
    interventions: Sequence[str] = INTERVENTIONS, scopes: Sequence[Scope] = SCOPES, *, n_latents: int = 6
) -> list[Ablation]:
    """Every (intervention, scope, thought) condition, in that order (see the module docstring for
    the combinations ``shuffle`` skips)."""
    unknown = [i for i in interventions if i not in INTERVENTIONS]
    if unknown:
        raise ValueError(f"unknown intervention {unknown[0]!r}; expected some of {INTERVENTIONS}")
    bad_scopes = [s for s in scopes if s not in SCOPES]
    if bad_scopes:
        raise ValueError(f"unknown scope {bad_scopes[0]!r}; expected some of {SCOPES}")
    grid = []
    for intervention in interventions:
        for scope in scopes:
            thoughts = [0] if scope == "all" else range(1, n_latents + 1)
            for k in thoughts:
                covered = n_latents if scope == "all" else (1 if scope == "single" else k)
                if intervention == "shuffle" and covered < 2:
                    continue
                grid.append(Ablation(intervention, scope, k))
    return grid


def problem_seed(problem_id: str, seed: int) -> int:
    """A seed for one problem that does not depend on its batch (CRC32 of seed and id)."""
    return zlib.crc32(f"{seed}:{problem_id}".encode())


@dataclass
class AblationInputs:
    """What the interventions of one batch draw on.

    Attributes:
        baseline_thoughts: the batch's own fed thoughts ``[batch, n_latents, d_model]`` (for shuffle).
        donor_thoughts: each problem's donor's fed thoughts ``[batch, n_latents, d_model]`` (for swap).
        means: reference mean thoughts ``[n_latents, d_model]`` (for mean), or None.
        seeds: one noise seed per problem.
        seed: the run's seed (the shuffle permutation).
    """

    baseline_thoughts: Tensor
    donor_thoughts: Tensor | None
    means: Tensor | None
    seeds: list[int]
    seed: int


def ablation_hooks(ablation: Ablation, inputs: AblationInputs, n_latents: int) -> Hooks:
    """The ``fwd_hooks`` of one ablation for one batch."""
    thoughts = thought_scope(ablation.scope, ablation.thought, n_latents)
    kind = ablation.intervention
    if kind == "zero":
        return zero_thoughts(thoughts)
    if kind == "mean":
        if inputs.means is None:
            raise ValueError("the mean intervention needs reference means")
        return mean_thoughts(thoughts, inputs.means)
    if kind == "noise":
        return noise_thoughts(thoughts, inputs.seeds)
    if kind == "swap":
        if inputs.donor_thoughts is None:
            raise ValueError("the swap intervention needs donor thoughts")
        return swap_thoughts(thoughts, inputs.donor_thoughts)
    if kind == "shuffle":
        return shuffle_thoughts(thoughts, inputs.baseline_thoughts, seed=inputs.seed)
    raise ValueError(f"unknown intervention {kind!r}")


def answer_numbers(model: CODIModel, answer_tokens: Sequence[Sequence[int]]) -> list[AnswerNumber | None]:
    """Each generated answer's number position (None where the answer has no number)."""
    return [find_answer_number(model.tokenizer, tokens) for tokens in answer_tokens]


def _forced(numbers: list[AnswerNumber | None], answer_tokens: Sequence[Sequence[int]]) -> list[AnswerNumber]:
    """Numbers to teacher-force, with a stand-in (the first answer token) where there is none."""
    return [n if n is not None else AnswerNumber(0, (), answer_tokens[i][0], "") for i, n in enumerate(numbers)]


def ablation_start(ablation: Ablation, n_latents: int) -> int:
    """The first thought an ablation changes (where its branch leaves the baseline run)."""
    return min(thought_scope(ablation.scope, ablation.thought, n_latents))


@dataclass
class Baseline:
    """A batch's run without interventions: its fed thoughts, generated answers and predictions."""

    thought_embeds: Tensor
    answer_tokens: list[list[int]]
    prediction: list[float | None]


def importance_rows(
    model: CODIModel,
    problems: list[Problem],
    ablations: Sequence[Ablation],
    inputs_for: Any,
    *,
    n_latents: int = 6,
    max_new_tokens: int = 256,
    max_rows: int = 256,
) -> pd.DataFrame:
    """One row per (problem, ablation) for one batch (``unit_id`` = problem id).

    The baseline run is computed once, and every ablation branches off it at the first thought it
    changes (:mod:`codi_lens.branching`): the thoughts before are the baseline's, ablations with the
    same start run as blocks of one forward (at most ``max_rows`` rows), each generates its answer
    (rows leave the batch at their EOS) and is teacher-forced on the baseline's answer up to the
    number, with logits computed at that one row.

    ``inputs_for(baseline)`` returns the batch's :class:`AblationInputs` from a :class:`Baseline`.
    Columns: ``problem_id, n_steps, difficulty, gold, intervention, scope, thought,
    baseline_prediction, baseline_correct, prediction, correct, answer_text, kl`` (nats,
    ``KL(baseline || ablated)`` at the answer number; NaN when the baseline answer has no number) and
    ``kl_first_token`` (the same at the first answer token, defined for every answer).
    """
    questions = [p.question for p in problems]
    trunk = grow_trunk(model, questions, n_latents=n_latents)
    unpatched = Branch((), n_latents + 1)
    baseline_tokens = run_branches(model, trunk, [unpatched], max_new_tokens=max_new_tokens)[0].answer_tokens
    baseline = Baseline(trunk.thought_inputs[:, :n_latents], baseline_tokens, model.decode_answers(baseline_tokens)[1])
    numbers = answer_numbers(model, baseline_tokens)
    forced = _forced(numbers, baseline_tokens)
    has_number = torch.tensor([n is not None for n in numbers])
    inputs = inputs_for(baseline)
    branches = [Branch(ablation_hooks(a, inputs, n_latents), ablation_start(a, n_latents)) for a in ablations]
    answers, rows = forced_answers(forced), [[0, n.index] for n in forced]  # the first answer token, the number
    reference = run_branches(model, trunk, [unpatched], answers, answer_index=rows)[0].logits.float()
    outputs = run_branches(
        model, trunk, branches, answers, answer_index=rows, max_new_tokens=max_new_tokens, max_rows=max_rows
    )
    nan = torch.tensor(float("nan"), dtype=torch.float64)
    frames = []
    for ablation, output in zip(ablations, outputs):
        texts, predictions = model.decode_answers(output.answer_tokens)
        logits = output.logits.float()
        kl = kl_divergence(reference[:, 1], logits[:, 1]).cpu().where(has_number, nan)
        kl_first = kl_divergence(reference[:, 0], logits[:, 0]).cpu()
        frames.append(
            pd.DataFrame(
                {
                    UNIT_COLUMN: [p.id for p in problems],
                    "problem_id": [p.id for p in problems],
                    "n_steps": [p.n_steps for p in problems],
                    "difficulty": [difficulty_bucket(p.n_steps) for p in problems],
                    "gold": [p.gold for p in problems],
                    "intervention": ablation.intervention,
                    "scope": ablation.scope,
                    "thought": ablation.thought,
                    "baseline_prediction": [_nan(x) for x in baseline.prediction],
                    "baseline_correct": [is_correct(x, p.gold) for x, p in zip(baseline.prediction, problems)],
                    "prediction": [_nan(x) for x in predictions],
                    "correct": [is_correct(x, p.gold) for x, p in zip(predictions, problems)],
                    "answer_text": texts,
                    "kl": kl.numpy(),
                    "kl_first_token": kl_first.numpy(),
                }
            )
        )
    return pd.concat(frames, ignore_index=True)


def _nan(x: float | None) -> float:
    return float("nan") if x is None else x


def step_importance(
    model: CODIModel,
    problems: list[Problem],
    out: str | Path,
    *,
    interventions: Sequence[str] = INTERVENTIONS,
    scopes: Sequence[Scope] = SCOPES,
    n_latents: int = 6,
    max_new_tokens: int = 256,
    reference: list[Problem] | None = None,
    seed: int = 0,
    batch_size: int = 32,
    max_rows: int = 256,
    settings: dict[str, Any] | None = None,
    overwrite: bool = False,
    progress: bool = True,
    executor: Executor | None = None,
) -> tuple[pd.DataFrame, ResultStore]:
    """Every ablation of :func:`ablation_grid` on every problem, resumable in ``out``: ``batch_size``
    problems at a time, ablations branching off each batch's baseline (see :func:`importance_rows`).

    ``executor``: where batches run (default here; :class:`~codi_lens.distributed.RayExecutor`: Ray tasks).

    ``reference``: the problems whose mean thoughts the ``mean`` intervention feeds (default: the
    problems themselves). The swap donor of problem i is problem i + 1 (the last one's is the
    first). Returns the rows (problem order, then ablation order) and the store (``finish`` it).
    """
    if "swap" in interventions and len(problems) < 2:
        raise ValueError("the swap intervention needs at least two problems")
    ablations = ablation_grid(interventions, scopes, n_latents=n_latents)
    reference = problems if reference is None else reference
    means = None
    if "mean" in interventions:
        means = mean_thought_embeds(model, [p.question for p in reference], n_latents=n_latents, batch_size=batch_size)
    donor = {p.id: problems[(i + 1) % len(problems)] for i, p in enumerate(problems)}
    store = ResultStore(
        out,
        {
            **(settings or {}),
            "checkpoint_sha256": model.checkpoint_sha256,
            "data": problems_fingerprint(problems),
            "n_problems": len(problems),
            "reference": problems_fingerprint(reference) if means is not None else None,
            "ablations": [a.name for a in ablations],
            "n_latents": n_latents,
            "max_new_tokens": max_new_tokens,
            "seed": seed,
        },
        overwrite=overwrite,
    )

    def inputs_for(batch: list[Problem]):
        def make(baseline: Baseline) -> AblationInputs:
            donors = None
            if "swap" in interventions:
                donor_questions = [donor[p.id].question for p in batch]
                donors = model.run_codi(donor_questions, n_latents=n_latents, max_new_tokens=1).thought_embeds
            return AblationInputs(
                baseline_thoughts=baseline.thought_embeds,
                donor_thoughts=donors,
                means=means,
                seeds=[problem_seed(p.id, seed) for p in batch],
                seed=seed,
            )

        return make

    rows = store.run(
        problems,
        lambda batch: importance_rows(
            model,
            batch,
            ablations,
            inputs_for(batch),
            n_latents=n_latents,
            max_new_tokens=max_new_tokens,
            max_rows=max_rows,
        ),
        unit_id=lambda p: p.id,
        batch_size=batch_size,
        desc="step importance",
        progress=progress,
        executor=executor,
    )
    return rows, store


def attention_importance_rows(
    model: CODIModel, problems: list[Problem], *, n_latents: int = 6, max_new_tokens: int = 256
) -> pd.DataFrame:
    """Attention and zero-ablation importance of every thought on the same problems (one batch).

    One row per (problem, layer, head, thought), thought 0 = BOT: ``attention_eot`` (from EOT),
    ``attention_answer`` (mean over the fed answer positions; NaN when none was fed) and, for thoughts
    1..n, ``kl`` and ``flipped`` (baseline right, ablated wrong) of zeroing that one thought (NaN at BOT,
    which is a token, not a fed thought).
    """
    questions = [p.question for p in problems]
    baseline, cache = model.run_codi_with_cache(
        questions,
        names_filter=pattern_hook_names(model.cfg.n_layers),
        n_latents=n_latents,
        max_new_tokens=max_new_tokens,
    )
    attention = attention_to_thoughts(
        cache, baseline.positions, [p.id for p in problems], n_kv_heads=model.cfg.n_key_value_heads
    )
    del cache
    attention["source_kind"] = attention["source"].str.split(":").str[0]
    keys = ["problem_id", "layer", "head", "kv_head", "thought"]
    wide = attention.pivot_table(index=keys, columns="source_kind", values="weight", aggfunc="mean").reset_index()
    wide = wide.rename(columns={"eot": "attention_eot", "answer": "attention_answer"})
    if "attention_answer" not in wide:
        wide["attention_answer"] = float("nan")
    ablations = ablation_grid(["zero"], ["single"], n_latents=n_latents)
    importance = importance_rows(
        model,
        problems,
        ablations,
        lambda b: AblationInputs(b.thought_embeds, None, None, [0] * len(problems), 0),
        n_latents=n_latents,
        max_new_tokens=max_new_tokens,
    )
    importance["flipped"] = importance["baseline_correct"] & ~importance["correct"]
    merged = wide.merge(
        importance[["problem_id", "thought", "n_steps", "difficulty", "baseline_correct", "correct", "flipped", "kl"]],
        on=["problem_id", "thought"],
        how="left",
    )
    merged.insert(0, UNIT_COLUMN, merged["problem_id"])
    order = {p.id: i for i, p in enumerate(problems)}
    return merged.sort_values(
        ["problem_id", "layer", "head", "thought"], key=lambda s: s.map(order) if s.name == "problem_id" else s
    ).reset_index(drop=True)


def attention_importance(
    model: CODIModel,
    problems: list[Problem],
    out: str | Path,
    *,
    n_latents: int = 6,
    max_new_tokens: int = 256,
    batch_size: int = 32,
    settings: dict[str, Any] | None = None,
    overwrite: bool = False,
    progress: bool = True,
    executor: Executor | None = None,
) -> tuple[pd.DataFrame, ResultStore]:
    """:func:`attention_importance_rows` over every problem, resumable in ``out``.
    ``executor``: where batches run (default here; :class:`~codi_lens.distributed.RayExecutor`: Ray tasks).
    """
    store = ResultStore(
        out,
        {
            **(settings or {}),
            "checkpoint_sha256": model.checkpoint_sha256,
            "data": problems_fingerprint(problems),
            "n_problems": len(problems),
            "n_latents": n_latents,
            "max_new_tokens": max_new_tokens,
        },
        overwrite=overwrite,
    )
    rows = store.run(
        problems,
        lambda batch: attention_importance_rows(model, batch, n_latents=n_latents, max_new_tokens=max_new_tokens),
        unit_id=lambda p: p.id,
        batch_size=batch_size,
        desc="attention and importance",
        progress=progress,
        executor=executor,
    )
    return rows, store
