"""What an SAE feature of a continuous thought stands for: top examples, frequency, position profile, tokens.

- :func:`feature_frequency`: per feature, how often it is active on a problem set and how strongly.
- :func:`top_examples`: the problems on which a feature is most active, with the question, the thought,
  the gold answer and the chain's intermediate values (what a researcher checks a feature against).
- :func:`position_profile`: the SAE of one site applied to the same hook at every thought (an SAE
  trained on ``blocks.1.hook_resid_post@3`` read at thoughts 0..6): where in the chain a feature fires.
- :func:`token_association`: which answer tokens a feature intervention makes more or less frequent:
  per token, its counts in the intervened answers against the reference answers, a log-odds ratio with a
  prior, Fisher's exact test and Benjamini-Hochberg q-values, and the ``|log-odds| > 0.5`` effect flag;
  :func:`feature_interventions` adds each feature's effect on the log-probability of the whole answer
  number (every token, so multi-token numbers count whole).

:func:`survey_features` and :func:`feature_interventions` run these on a set of SAEs and problems, each
resumable in an output folder (what ``python -m experiments.sae_features`` does).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.stats
import torch
from jaxtyping import Float
from sae_lens import SAE
from torch import Tensor

from codi_lens.activations import ActivationDataset, collect_activations
from codi_lens.core.hooks import Hooks
from codi_lens.core.model import CODIModel
from codi_lens.core.sites import Site
from codi_lens.data.problems import Problem
from codi_lens.run.executors import Executor
from codi_lens.run.store import UNIT_COLUMN, ResultStore
from codi_lens.saes.edits import FEATURE_OPS, feature_edit
from codi_lens.saes.ids import feature_id
from codi_lens.saes.io import sae_site
from codi_lens.saes.quality import PlainRun, encode_decode
from codi_lens.saes.splice import attached
from codi_lens.stats import benjamini_hochberg, bootstrap_ci


def feature_frequency(acts: Float[Tensor, "n d_sae"]) -> pd.DataFrame:
    """One row per feature: ``frequency`` (share of rows where it is active), ``mean_when_active`` and
    ``max_activation``."""
    active = acts > 0
    count = active.sum(0)
    total = torch.where(active, acts, torch.zeros_like(acts)).sum(0)
    return pd.DataFrame(
        {
            "feature": np.arange(acts.shape[1]),
            "frequency": (count.float() / max(1, len(acts))).numpy(),
            "mean_when_active": (total / count.clamp(min=1)).numpy(),
            "max_activation": acts.max(0).values.numpy() if len(acts) else np.zeros(acts.shape[1]),
        }
    )


def top_examples(
    acts: Float[Tensor, "n d_sae"],
    problems: Sequence[Problem],
    features: Sequence[int],
    *,
    k: int = 10,
    site: Site | None = None,
    predictions: Sequence[float | None] | None = None,
) -> pd.DataFrame:
    """The ``k`` problems (rows of ``acts``, in the order of ``problems``) with the highest activation of
    each feature, active ones only: ``feature, rank, problem_id, activation, question, thought, gold,
    intermediates`` (the chain's values, ``;``-joined) and ``prediction`` when given."""
    if len(acts) != len(problems):
        raise ValueError(f"{len(acts)} activation rows for {len(problems)} problems")
    rows = []
    for feature in features:
        column = acts[:, feature]
        order = torch.argsort(column, descending=True)[:k]
        for rank, i in enumerate(order.tolist()):
            if column[i] <= 0:
                break
            p = problems[i]
            rows.append(
                {
                    "feature": int(feature),
                    "feature_id": None if site is None else feature_id(site, feature),
                    "rank": rank,
                    "problem_id": p.id,
                    "activation": float(column[i]),
                    "question": p.question,
                    "thought": None if site is None else site.thought,
                    "gold": p.gold,
                    "intermediates": ";".join(f"{v:g}" for v in p.intermediates),
                    "prediction": None if predictions is None else predictions[i],
                }
            )
    return pd.DataFrame(rows)


def position_profile(sae: SAE, dataset: ActivationDataset, thoughts: Sequence[int]) -> pd.DataFrame:
    """The SAE applied to its own hook at each of ``thoughts`` (the dataset must hold those sites): one row
    per (feature, thought) with ``frequency`` and ``mean_activation``; ``own`` marks the SAE's thought."""
    site = sae_site(sae)
    frames = []
    for other in (site.at(k) for k in thoughts):
        rows, _ = dataset.load(other)
        acts, _ = encode_decode(sae, rows)
        frames.append(
            pd.DataFrame(
                {
                    "feature": np.arange(acts.shape[1]),
                    "thought": other.thought,
                    "frequency": (acts > 0).float().mean(0).cpu().numpy(),
                    "mean_activation": acts.mean(0).cpu().numpy(),
                    "own": other.thought == site.thought,
                }
            )
        )
    return pd.concat(frames, ignore_index=True)


def token_association(
    reference: Sequence[Sequence[str]],
    intervened: Sequence[Sequence[str]],
    *,
    prior: float = 0.5,
    alpha: float = 0.05,
    min_log_odds: float = 0.5,
) -> pd.DataFrame:
    """Tokens whose frequency in the answers shifts under an intervention.

    ``reference`` and ``intervened`` hold each answer's tokens (as strings, e.g. the model tokenizer's
    ``convert_ids_to_tokens``), one list per problem. Per token, with ``N`` the total tokens written in a
    condition:

    - ``count_intervened`` / ``count_reference``: how often it is written (every occurrence counts, so a chain
      that repeats a number counts it each time), of ``total_intervened`` / ``total_reference`` tokens;
      ``answers_intervened`` / ``answers_reference``: answers containing it;
    - ``log_odds``: the log odds ratio of a written token being this one, intervened against reference, each
      of the four counts smoothed by ``prior`` (a symmetric Dirichlet prior; 0.5 is the Haldane-Anscombe
      correction), ``log((a + p) / (N_i - a + p)) - log((c + p) / (N_r - c + p))``;
    - ``p_value``: Fisher's exact test (two-sided, ``scipy.stats.fisher_exact``) on the 2x2 table of counts
      ``[[a, N_i - a], [c, N_r - c]]``: exact at the small counts most tokens have, where the chi-square
      approximation is poor (expected cells under 5). It treats written tokens as independent draws; tokens
      of one answer are not, so read it with the per-answer columns beside it;
    - ``q_value`` (Benjamini-Hochberg across the tokens tested), ``significant`` (q < ``alpha``),
      ``large_effect`` (``|log_odds| > min_log_odds``) and ``flagged`` (both).

    Sorted by p-value."""
    counted_int = [Counter(a) for a in intervened]
    counted_ref = [Counter(a) for a in reference]
    total_int, total_ref = Counter(), Counter()
    for c in counted_int:
        total_int.update(c)
    for c in counted_ref:
        total_ref.update(c)
    n_int, n_ref = sum(total_int.values()), sum(total_ref.values())
    rows = []
    for token in sorted(set(total_int) | set(total_ref)):
        a, c = total_int[token], total_ref[token]
        log_odds = np.log((a + prior) / (n_int - a + prior)) - np.log((c + prior) / (n_ref - c + prior))
        rows.append(
            {
                "token": token,
                "count_intervened": a,
                "count_reference": c,
                "total_intervened": n_int,
                "total_reference": n_ref,
                "answers_intervened": sum(token in x for x in counted_int),
                "answers_reference": sum(token in x for x in counted_ref),
                "log_odds": float(log_odds),
                "p_value": float(scipy.stats.fisher_exact([[a, n_int - a], [c, n_ref - c]]).pvalue),
            }
        )
    columns = [
        "token",
        "count_intervened",
        "count_reference",
        "total_intervened",
        "total_reference",
        "answers_intervened",
        "answers_reference",
        "log_odds",
        "p_value",
    ]
    frame = pd.DataFrame(rows, columns=columns)
    frame["significant"], frame["q_value"] = benjamini_hochberg(frame["p_value"].to_numpy(), alpha)
    frame["large_effect"] = frame["log_odds"].abs() > min_log_odds
    frame["flagged"] = frame["significant"] & frame["large_effect"]
    return frame.sort_values(["p_value", "token"], kind="stable").reset_index(drop=True)


def answer_tokens_as_text(tokenizer, answers: Sequence[Sequence[int]], eos: int | None = None) -> list[list[str]]:
    """Each answer's token ids as the tokenizer's token strings (the stop token left out)."""
    return [tokenizer.convert_ids_to_tokens([t for t in ids if t != eos]) for ids in answers]


@dataclass
class FeatureSurvey:
    """Every feature of a set of SAEs on a set of problems.

    Attributes:
        table: one row per (SAE, feature): ``sae_id``, ``site``, ``feature``, ``frequency``,
            ``mean_when_active``, ``max_activation``.
        dataset: the problems' activations at every thought of the SAEs' sites.
        acts: per SAE id, its feature activations at its own site, ``[n_problems, d_sae]`` in problem order.
    """

    table: pd.DataFrame
    dataset: ActivationDataset
    acts: dict[str, Float[Tensor, "n_problems d_sae"]]


def survey_features(
    model: CODIModel,
    saes: dict[str, SAE],
    problems: list[Problem],
    out: str | Path,
    *,
    n_latents: int = 6,
    batch_size: int = 100,
    settings: dict[str, Any] | None = None,
    overwrite: bool = False,
    executor: Executor | None = None,
) -> tuple[FeatureSurvey, ResultStore]:
    """The activations of every SAE's site at every thought (``out/activations``, resumable) and each
    feature's frequency (the store ``out``, one unit per SAE). Returns the survey and the store."""
    out = Path(out)
    store = ResultStore(out, settings or {}, overwrite=overwrite)
    sites = sorted({s for sae in saes.values() for s in sae_site(sae).across_thoughts(n_latents)})
    dataset = collect_activations(
        model,
        problems,
        sites,
        out / "activations",
        n_latents=n_latents,
        batch_size=batch_size,
        executor=executor,
        overwrite=overwrite,
    )
    acts = {i: encode_decode(sae, dataset.load(sae_site(sae))[0])[0].cpu() for i, sae in saes.items()}

    def describe(batch: list[str]) -> pd.DataFrame:
        frames = [feature_frequency(acts[i]).assign(**{UNIT_COLUMN: i, "sae_id": i}) for i in batch]
        return pd.concat(frames, ignore_index=True)

    table = store.run(list(saes), describe, unit_id=str, batch_size=1, desc="features")
    table["site"] = table["sae_id"].map({i: sae_site(s).id for i, s in saes.items()})
    table["feature_id"] = [feature_id(site, f) for site, f in zip(table["site"], table["feature"])]
    return FeatureSurvey(table, dataset, acts), store


def most_frequent(table: pd.DataFrame, n: int) -> list[tuple[str, int]]:
    """``(sae_id, feature)`` of each SAE's ``n`` most frequent features, SAEs in id order."""
    ranked = table.sort_values(["sae_id", "frequency"], ascending=[True, False], kind="stable")
    return [(i, int(f)) for i, group in ranked.groupby("sae_id", sort=False) for f in group["feature"][:n]]


def feature_interventions(
    model: CODIModel,
    saes: dict[str, SAE],
    problems: list[Problem],
    survey: FeatureSurvey,
    out: str | Path,
    *,
    intervene: int = 5,
    features: Sequence[tuple[str, int]] | None = None,
    op: str = "clamp",
    clamp_scale: float = 10.0,
    n_latents: int = 6,
    max_new_tokens: int = 256,
    settings: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> pd.DataFrame:
    """Each SAE's ``intervene`` most frequent features (or the ``(sae_id, feature)`` pairs of ``features``, e.g.
    the causal screen's selection) intervened on (``op``: ``clamp`` to ``clamp_scale``
    times the feature's largest activation, or ``ablate``) inside the loop, with the SAE spliced in with its
    error term: the answers' tokens against the SAE's reference run (:func:`token_association`), and the
    change in the log-probability of the plain run's whole answer number (every token of it, teacher-forced;
    the same measure as step importance), one resumable unit per feature in ``out``, finished there.

    Returns the rows: one per feature x answer token (``sae_id``, ``feature``, ``value``, ``answers_changed``,
    the association columns) with the feature's answer-number effect repeated on each: ``logprob_change``
    (nats, mean over the problems whose plain answer has a number, edited minus plain) and its bootstrap CI
    ``logprob_change_low``/``_high`` (95%, over problems), and ``n_scored`` (those problems)."""
    FEATURE_OPS[op]
    questions = [p.question for p in problems]
    eos = model.codi_tokens.eos
    plain: list[PlainRun] = []  # computed on first use (a resumed run that is done needs no model)

    def edited_run(sae_id: str, fwd_hooks: Hooks) -> tuple[list[list[str]], np.ndarray]:
        """Answer tokens with the SAE spliced in under ``fwd_hooks``, and each scored problem's change in the
        log-probability of the plain answer number."""
        if not plain:
            plain.append(PlainRun.of(model, problems, n_latents=n_latents, max_new_tokens=max_new_tokens))
        with attached(model, [saes[sae_id]], use_error_term=True):
            result = model.run_codi(questions, n_latents=n_latents, max_new_tokens=max_new_tokens, fwd_hooks=fwd_hooks)
            scored = (
                plain[0].answer_scores(model, fwd_hooks=fwd_hooks, n_latents=n_latents)
                if plain[0].with_number
                else None
            )
        change = (scored[1] - plain[0].logprob).cpu().numpy() if scored is not None else np.array([])
        return answer_tokens_as_text(model.tokenizer, result.answer_tokens, eos), change

    references: dict[str, list[list[str]]] = {}
    largest = survey.table.set_index(["sae_id", "feature"])["max_activation"]

    def associate(batch: list[tuple[str, int]]) -> pd.DataFrame:
        frames = []
        for sae_id, feature in batch:
            if sae_id not in references:
                references[sae_id] = edited_run(sae_id, [])[0]
            value = clamp_scale * float(largest[(sae_id, feature)]) if op == "clamp" else 0.0
            edited, change = edited_run(sae_id, feature_edit(saes[sae_id], [feature], op, value))
            changed = sum(a != b for a, b in zip(references[sae_id], edited))
            estimate, low, high = bootstrap_ci(change)
            frames.append(
                token_association(references[sae_id], edited).assign(
                    **{UNIT_COLUMN: f"{sae_id}/{feature}"},
                    sae_id=sae_id,
                    feature=feature,
                    feature_id=feature_id(sae_site(saes[sae_id]), feature),
                    value=value,
                    answers_changed=changed,
                    logprob_change=estimate,
                    logprob_change_low=low,
                    logprob_change_high=high,
                    n_scored=len(change),
                )
            )
        return pd.concat(frames, ignore_index=True)

    store = ResultStore(out, settings or {}, overwrite=overwrite)
    rows = store.run(
        list(features) if features is not None else most_frequent(survey.table, intervene),
        associate,
        unit_id=lambda u: f"{u[0]}/{u[1]}",
        batch_size=1,
        desc="interventions",
        unit="feature",
        model=model,
    )
    store.finish(rows)
    return rows
