"""Step importance: which continuous thoughts matter, measured inside the real latent loop.

For each problem, the baseline run (no intervention) gives the prediction and the answer tokens.
Every ablation (intervention x scope x thought) is then generated greedily (is the answer still
right?) and teacher-forced on the baseline's own answer tokens up to the answer number, where
``KL(baseline || ablated)`` is taken at the position predicting the number's first token (see
:mod:`codi_lens.metrics`). Later thoughts are recomputed from the ablated one by the loop itself.
Each ablation branches off the baseline run at the first thought it changes, and ablations are
batched (see :mod:`codi_lens.core.branching` and ``python -m benchmarks.step_importance``).

Interventions on the fed thought and their scopes come from :mod:`codi_lens.interventions.registry`:
``zero``, ``mean`` (the mean thought over a reference set), ``noise`` (Gaussian, of the thought's norm,
seeded per problem so a problem's noise does not depend on its batch), ``swap`` (the next problem's
thought), ``shuffle`` (the baseline's own thoughts in a seeded order; a single thought cannot be shuffled,
so ``shuffle`` has no ``single`` scope and no ``cumulative`` scope at k = 1); scopes ``single`` (thought k),
``cumulative`` (thoughts 1..k), ``all`` (every thought; ``thought`` 0 in tables).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from codi_lens.attention import attention_to_thoughts, pattern_hook_names, question_to_thought, thought_to_thought
from codi_lens.core.answers import is_correct
from codi_lens.core.branching import Branch, grow_trunk, run_branches
from codi_lens.core.hooks import Hooks
from codi_lens.core.model import CODIModel
from codi_lens.core.positions import gather_at
from codi_lens.data.pairs import question_numbers
from codi_lens.data.problems import Problem, difficulty_bucket, problems_fingerprint
from codi_lens.interventions.positions import mean_activation
from codi_lens.interventions.registry import DEFAULT_SCOPES, INTERVENTIONS, SCOPES, AblationInputs, thought_scope
from codi_lens.interventions.steps import StepSite
from codi_lens.interventions.thoughts import mean_thought_embeds
from codi_lens.metrics import AnswerNumber, find_answer_number, kl_divergence, number_logprob, whole_number_rows
from codi_lens.patching.prepare import number_tokens
from codi_lens.run.executors import Executor
from codi_lens.run.store import UNIT_COLUMN, ResultStore
from codi_lens.stats import bootstrap_ci


@dataclass(frozen=True)
class Ablation:
    """One condition: an intervention over a scope ending at ``thought`` (0 for scope ``all``), acting on the
    thoughts ``members`` (1-based; for ``pairs`` and ``triples`` the set itself, ``thought`` its last)."""

    intervention: str
    scope: str
    thought: int
    members: tuple[int, ...] = ()
    draw: int = 0

    @property
    def name(self) -> str:
        where = "+".join(map(str, self.members)) if SCOPES[self.scope].set_size else str(self.thought)
        return f"{self.intervention}/{self.scope}/{where}" + (f"/draw{self.draw}" if self.draw else "")

    def thoughts(self, n_latents: int) -> list[int]:
        """The thoughts it acts on."""
        return list(self.members) if self.members else thought_scope(self.scope, self.thought, n_latents)


def ablation_grid(
    interventions: Sequence[str] = INTERVENTIONS.names(),
    scopes: Sequence[str] = DEFAULT_SCOPES,
    *,
    n_latents: int = 6,
    draws: int = 1,
) -> list[Ablation]:
    """Every (intervention, scope, thought or set of thoughts) condition, in that order, and for a resampled
    intervention (``swap``, ``noise``) each of ``draws`` draws (another donor, another seed); a scope covering
    fewer thoughts than an intervention acts on (a single thought for ``shuffle``) is skipped. Names come from
    the registries of :mod:`codi_lens.interventions.registry` (a :class:`~codi_lens.core.errors.ChoiceError`
    lists them)."""
    INTERVENTIONS.check(interventions)
    SCOPES.check(scopes)
    if draws < 1:
        raise ValueError(f"draws must be at least 1, got {draws}")
    grid = []
    for intervention in interventions:
        entry = INTERVENTIONS[intervention]
        for scope in scopes:
            for k, members in SCOPES[scope].sets(n_latents):
                if len(members) < entry.min_thoughts:
                    continue
                for draw in range(draws if entry.resampled else 1):
                    grid.append(Ablation(intervention, scope, k, members, draw))
    return grid


def problem_seed(problem_id: str, seed: int) -> int:
    """A seed for one problem that does not depend on its batch (CRC32 of seed and id)."""
    return zlib.crc32(f"{seed}:{problem_id}".encode())


def ablation_hooks(ablation: Ablation, inputs: AblationInputs, n_latents: int) -> Hooks:
    """The ``fwd_hooks`` of one ablation for one batch (the registry's builder on the thoughts it acts on)."""
    return INTERVENTIONS[ablation.intervention].build(ablation.thoughts(n_latents), inputs.drawn(ablation.draw))


def answer_numbers(model: CODIModel, answer_tokens: Sequence[Sequence[int]]) -> list[AnswerNumber | None]:
    """Each generated answer's number position (None where the answer has no number)."""
    return [find_answer_number(model.tokenizer, tokens) for tokens in answer_tokens]


def _forced(numbers: list[AnswerNumber | None], answer_tokens: Sequence[Sequence[int]]) -> list[AnswerNumber]:
    """Numbers to teacher-force, with a stand-in (the first answer token) where there is none."""
    return [n if n is not None else AnswerNumber(0, (), answer_tokens[i][0], "") for i, n in enumerate(numbers)]


def ablation_start(ablation: Ablation, n_latents: int) -> int:
    """The first thought an ablation changes (where its branch leaves the baseline run)."""
    return min(ablation.thoughts(n_latents))


@dataclass
class Baseline:
    """A batch's run without interventions: its fed thoughts, generated answers and predictions."""

    thought_embeds: Float[Tensor, "batch n_latents d_model"]
    answer_tokens: list[list[int]]
    prediction: list[float | None]


def importance_rows(
    model: CODIModel,
    problems: list[Problem],
    ablations: Sequence[Ablation],
    inputs_for: Callable[[Baseline], AblationInputs],
    *,
    n_latents: int = 6,
    max_new_tokens: int = 256,
    max_rows: int = 256,
) -> pd.DataFrame:
    """One row per (problem, ablation) for one batch (``unit_id`` = problem id).

    The baseline run is computed once, and every ablation branches off it at the first thought it
    changes (:mod:`codi_lens.core.branching`): the thoughts before are the baseline's, ablations with the
    same start run as blocks of one forward (at most ``max_rows`` rows), each generates its answer
    (rows leave the batch at their EOS) and is teacher-forced on the baseline's answer up to the
    number, with logits computed at that one row.

    ``inputs_for(baseline)`` returns the batch's :class:`AblationInputs` from a :class:`Baseline`.
    Columns: ``problem_id, n_steps, difficulty, gold, intervention, scope, thought,
    baseline_prediction, baseline_correct, prediction, correct, answer_text, kl`` (nats,
    ``KL(baseline || ablated)`` at the answer number's first token; NaN when the baseline answer has no
    number), ``kl_first_token`` (the same at the first answer token, defined for every answer) and
    ``logprob_change`` (nats: the log-probability of the baseline's whole answer number, every token of it,
    teacher-forced, ablated minus baseline; NaN without a number; defined however many tokens the number
    spans).
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
    # Rows read: the first answer token, then every token of the number (padded; ``mask`` marks the real ones).
    answers, number_rows, mask = whole_number_rows(forced)
    rows = [[0, *r] for r in number_rows]
    reference = run_branches(model, trunk, [unpatched], answers, answer_index=rows)[0].logits.float()
    reference_logprob = number_logprob(reference[:, 1:], forced, mask).cpu()
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
        logprob_change = (number_logprob(logits[:, 1:], forced, mask).cpu() - reference_logprob).where(has_number, nan)
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
                    "thoughts": ",".join(map(str, ablation.thoughts(n_latents))),
                    "draw": ablation.draw,
                    "baseline_prediction": [_nan(x) for x in baseline.prediction],
                    "baseline_correct": [is_correct(x, p.gold) for x, p in zip(baseline.prediction, problems)],
                    "prediction": [_nan(x) for x in predictions],
                    "correct": [is_correct(x, p.gold) for x, p in zip(predictions, problems)],
                    "answer_text": texts,
                    "kl": kl.numpy(),
                    "kl_first_token": kl_first.numpy(),
                    "logprob_change": logprob_change.numpy(),
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
    interventions: Sequence[str] = INTERVENTIONS.names(),
    scopes: Sequence[str] = DEFAULT_SCOPES,
    n_latents: int = 6,
    max_new_tokens: int = 256,
    reference: list[Problem] | None = None,
    seed: int = 0,
    draws: int = 1,
    site: str | None = None,
    batch_size: int = 32,
    max_rows: int = 256,
    settings: dict[str, Any] | None = None,
    overwrite: bool = False,
    progress: bool = True,
    executor: Executor | None = None,
) -> tuple[pd.DataFrame, ResultStore]:
    """Every ablation of :func:`ablation_grid` on every problem, resumable in ``out``: ``batch_size``
    problems at a time, ablations branching off each batch's baseline (see :func:`importance_rows`).

    ``executor``: where batches run (default here; :class:`~codi_lens.run.executors.RayExecutor`: Ray tasks).

    ``reference``: the problems whose mean thoughts the ``mean`` intervention feeds (default: the
    problems themselves). The swap donor of problem i is problem i + 1 (the last one's is the
    first). ``draws``: how many donors (``swap``) or noise seeds (``noise``) per problem; draw d's donor of
    problem i is problem i + 1 + d and its seed ``seed + d`` (rows carry ``draw``; tables average the draws of a
    problem before the CI over problems). Returns the rows (problem order, then ablation order) and the store
    (``finish`` it).
    """
    ablations = ablation_grid(interventions, scopes, n_latents=n_latents, draws=draws)
    donor_interventions = [name for name in interventions if INTERVENTIONS[name].needs_donors]
    needs_donors = bool(donor_interventions)
    if needs_donors and len(problems) < draws + 1:
        raise ValueError(
            f"the {donor_interventions[0]} intervention with {draws} donor(s) per problem needs at least "
            f"{draws + 1} problems (each problem's donors are the next {draws})"
        )
    reference = problems if reference is None else reference
    step_site = StepSite(site)
    steps = [f"thought:{k}" for k in range(1, n_latents + 1)]
    means = None
    if any(INTERVENTIONS[name].needs_means for name in interventions):
        questions = [p.question for p in reference]
        if site is None:
            means = mean_thought_embeds(model, questions, n_latents=n_latents, batch_size=batch_size, progress=progress)
        else:
            means = mean_activation(model, questions, site, steps, n_latents=n_latents, batch_size=batch_size)

    def values_at_site(questions: list[str]) -> Tensor:
        """The questions' unpatched values at the site, at every thought: ``[batch, n_latents, *rest]``."""
        if site is None:
            return model.run_latents(questions, n_latents=n_latents).thought_embeds
        run = model.run_latents(questions, names_filter=site, n_latents=n_latents)
        return gather_at(run.cache[site], run.positions.resolve(steps))

    # Draw d's donor of problem i is problem i + 1 + d (wrapping around), never the problem itself.
    donor = {(p.id, d): problems[(i + 1 + d) % len(problems)] for i, p in enumerate(problems) for d in range(draws)}
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
            **({"draws": draws} if draws > 1 else {}),
            **({"site": site} if site is not None else {}),
        },
        overwrite=overwrite,
    )

    def inputs_for(batch: list[Problem]):
        def make(baseline: Baseline) -> AblationInputs:
            def donors(d: int) -> Tensor | None:
                return values_at_site([donor[p.id, d].question for p in batch]) if needs_donors else None

            def seeds(d: int) -> list[int]:
                return [problem_seed(p.id, seed + d) for p in batch]

            own = baseline.thought_embeds if site is None else values_at_site([p.question for p in batch])
            return AblationInputs(
                baseline_thoughts=own,
                donor_thoughts=donors(0),
                means=means,
                seeds=seeds(0),
                seed=seed,
                draws=[(donors(d), seeds(d)) for d in range(1, draws)],
                site=step_site,
                model=model,
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
        ).assign(site=step_site.name),
        unit_id=lambda p: p.id,
        batch_size=batch_size,
        desc="step importance",
        progress=progress,
        executor=executor,
        size=lambda _: len(ablations),
        unit="branch",
        model=model,
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
    ``executor``: where batches run (default here; :class:`~codi_lens.run.executors.RayExecutor`: Ray tasks).
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
        unit="problem",
        model=model,
    )
    return rows, store


def importance_table(results: pd.DataFrame, by: Sequence[str] = ("intervention", "scope", "thought")) -> pd.DataFrame:
    """Step importance per condition with 95% bootstrap CIs over problems.

    ``results`` has one row per (problem, condition) with ``baseline_correct``, ``correct``,
    ``prediction``, ``baseline_prediction`` and ``kl``. Per group of ``by``:

    - ``importance``: share of problems right at baseline and wrong under the intervention;
    - ``accuracy_drop``: baseline accuracy minus accuracy (can be negative);
    - ``answer_changed``: share whose prediction differs from the baseline's;
    - ``kl``: mean KL(baseline || intervened) at the answer, nats;
    - ``logprob_change`` (where the rows have it): mean change in the log-probability of the baseline's whole
      answer number, nats;

    each with ``_low`` / ``_high`` bounds. With several draws of a resampled intervention (a ``draw`` column),
    each problem's draws are averaged first, so every CI rests on problems; ``n_draws`` says how many draws each
    problem's value averages, and ``importance_draw_sd`` / ``kl_draw_sd`` the spread of the condition's mean
    across draws (standard deviation; NaN for one draw).
    """
    frame = results.assign(
        _importance=(results["baseline_correct"] & ~results["correct"]).astype(float),
        _drop=results["baseline_correct"].astype(float) - results["correct"].astype(float),
        _changed=(~_same_prediction(results["prediction"], results["baseline_prediction"])).astype(float),
    )
    values = ["_importance", "_drop", "_changed", "kl", *(["logprob_change"] if "logprob_change" in frame else [])]
    draws = frame["draw"] if "draw" in frame else pd.Series(0, index=frame.index)
    spread = (
        frame.assign(_draw=draws)
        .groupby([*by, "_draw"], sort=True)[["_importance", "kl"]]
        .mean()
        .groupby(level=list(range(len(by))))
        .std()
    )
    n_draws = frame.assign(_draw=draws).groupby(list(by), sort=True)["_draw"].nunique()
    frame = frame.groupby([*by, "problem_id"], sort=True, as_index=False)[values].mean()
    rows = []
    for key, group in frame.groupby(list(by), sort=True):
        row = dict(zip(by, key if isinstance(key, tuple) else (key,)))
        row["n"] = len(group)
        row["n_draws"] = int(n_draws.loc[key])
        row["importance_draw_sd"], row["kl_draw_sd"] = (float(x) for x in spread.loc[key, ["_importance", "kl"]])
        for name, column in (
            ("importance", "_importance"),
            ("accuracy_drop", "_drop"),
            ("answer_changed", "_changed"),
            ("kl", "kl"),
            *((("logprob_change", "logprob_change"),) if "logprob_change" in group else ()),
        ):
            estimate, low, high = bootstrap_ci(group[column].astype(float).to_numpy())
            row.update({name: estimate, f"{name}_low": low, f"{name}_high": high})
        rows.append(row)
    return pd.DataFrame(rows)


def _same_prediction(a: pd.Series, b: pd.Series) -> pd.Series:
    """Equal predictions, two missing answers counting as equal."""
    return (a == b) | (a.isna() & b.isna())


def set_interactions(results: pd.DataFrame) -> pd.DataFrame:
    """Per problem and ablation of a set of thoughts (scopes ``pairs``, ``triples``): how the set's effect compares
    with its members' single ablations (same intervention, same problem). Columns: ``problem_id, intervention,
    scope, thoughts``, ``logprob_interaction`` (nats: the set's change in the log-probability of the baseline's
    answer number minus the sum of its members' changes; 0 when their effects add, negative when together they
    do more harm than apart (synergy), positive when they do less (redundancy)), ``breaks_only_together`` (the
    set breaks a right answer that no single member breaks) and ``breaks_alone`` (some member alone breaks it).
    Needs the ``single`` scope in the same results."""
    singles = results[results["scope"] == "single"].set_index(["problem_id", "intervention", "thought"])
    sets = results[results["scope"].map(lambda s: SCOPES[s].set_size > 0)]
    out = []
    for row in sets.itertuples():
        members = [int(k) for k in row.thoughts.split(",")]
        try:
            alone = singles.loc[[(row.problem_id, row.intervention, k) for k in members]]
        except KeyError:
            raise ValueError(
                f"set interactions need the single ablation of every member ({row.thoughts}): add scope 'single'"
            ) from None
        broken_alone = bool((alone["baseline_correct"] & ~alone["correct"]).any())
        broken = bool(row.baseline_correct and not row.correct)
        out.append(
            {
                "problem_id": row.problem_id,
                "intervention": row.intervention,
                "scope": row.scope,
                "thoughts": row.thoughts,
                "logprob_interaction": row.logprob_change - alone["logprob_change"].sum(),
                "breaks_only_together": float(broken and not broken_alone),
                "breaks_alone": float(broken_alone),
            }
        )
    return pd.DataFrame(out)


def attention_maps(
    model: CODIModel, problems: list[Problem], *, n_latents: int = 6, batch_size: int = 16
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Attention among the latent steps and from them to the question, over the latent loop of every problem:
    ``(thought_to_thought, question_to_thought)`` averaged over heads per problem and layer (see
    :func:`codi_lens.attention.thought_to_thought` and :func:`codi_lens.attention.question_to_thought`; question
    numbers are found as :func:`codi_lens.data.pairs.question_numbers` finds them)."""
    among, reads = [], []
    for start in range(0, len(problems), batch_size):
        batch = problems[start : start + batch_size]
        questions, ids = [p.question for p in batch], [p.id for p in batch]
        run = model.run_latents(questions, names_filter=pattern_hook_names(model.cfg.n_layers), n_latents=n_latents)
        numbers = [
            [number_tokens(model, q, m) for m in range(len(question_numbers(model.latent_loop.question_text(q))))]
            for q in questions
        ]
        keys = ["problem_id", "layer"]
        t2t = thought_to_thought(run.cache, run.positions, ids)
        among.append(t2t.groupby([*keys, "query_thought", "key_thought"], sort=False)["weight"].mean().reset_index())
        q2t = question_to_thought(run.cache, run.positions, ids, numbers)
        reads.append(q2t.groupby([*keys, "thought", "target"], sort=False)["weight"].mean().reset_index())
    return pd.concat(among, ignore_index=True), pd.concat(reads, ignore_index=True)
