"""The causal screen: which SAE features of the thoughts change the answer when edited inside the loop.

For every screened feature of every SAE (one SAE per site, spliced in with its error term, so the unedited run
is the model's own), two edits at the SAE's site: ``ablate`` (the feature set to 0) and ``clamp`` (set to a
high quantile of its activations where it is active on the screened problems). Per problem, against the
unedited run:

- ``gold_logprob_change``: the log-probability of the gold answer number (every token of it, teacher-forced
  after the model's own answer prefix: :func:`~codi_lens.metrics.gold_number`; after CODI's answer template
  where the model's answer has no number), edited minus unedited, nats;
- ``kl``: KL(unedited || edited) at the row predicting the number's first token, nats;
- ``correct_change``: correct (greedy answer) edited minus unedited, in {-1, 0, 1}.

Each clamp comes with a control (:data:`CONTROL`): the same push at the site along a random direction.

Per (feature, edit): an ablation is tested over the problems where the feature is active (elsewhere it changes
nothing), a clamp over every problem as its change minus its control's; the mean with a 95% bootstrap CI over
problems, Cohen's d_z of the per-problem effect, a one-sample t-test p-value, and Benjamini-Hochberg q-values
across every (feature, edit) screened. A feature is *causal* when one of its edits has q < alpha and a mean
effect of at least ``min_effect`` nats (an edit tested on fewer than ``min_problems`` problems gets no p-value);
the causal features of each site are ranked by the largest |d| among their passing edits and the top
``top_per_site`` kept (:func:`select_causal`).

Cost: an edit at thought k leaves every step before k as in the unedited run, so each SAE's problems run
once up to its thought (the trunk) and every edit is a branch from there, many edits as row blocks of one
forward (:mod:`codi_lens.core.branching`). Ablating a feature where it is inactive changes nothing, so those
cells are written as exactly 0 (they run in the same forward as the others; what they would show is float
rounding of the batch), and a feature active on no screened problem is not run at all (its ablation is
exactly 0; it has no clamp value): ``live`` is False and it is never selected.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
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

from codi_lens.core.answers import is_correct
from codi_lens.core.branching import Branch, grow_trunk, run_branches
from codi_lens.core.hooks import Hooks
from codi_lens.core.model import CODIModel
from codi_lens.data.problems import Problem
from codi_lens.metrics import AnswerNumber, gold_number, kl_divergence, number_logprob, whole_number_rows
from codi_lens.pathways import target_activation
from codi_lens.run.store import UNIT_COLUMN, ResultStore, batches_heard
from codi_lens.saes.edits import feature_edit, random_direction_edit
from codi_lens.saes.ids import feature_id, parse_feature_id
from codi_lens.saes.io import SAEError, sae_site
from codi_lens.saes.splice import attached, feature_recorder, recorded_features
from codi_lens.stats import benjamini_hochberg, bootstrap_ci, cohens_d

#: The edits the screen makes of each feature.
SCREEN_OPS = ("ablate", "clamp")
#: The control run beside every clamp: the same push at the site along a random direction
#: (:func:`~codi_lens.saes.edits.random_direction_edit`).
CONTROL = "clamp_control"
#: Fewest problems an edit is tested on (for an ablation: problems where the feature is active).
MIN_PROBLEMS = 10
#: Smallest mean effect (nats of the gold answer's log-probability) a passing edit must have to select its
#: feature: a change of 0.05 nats is a 5% change in the answer's probability.
MIN_EFFECT = 0.05
#: The per-problem measures of an edit's effect (columns of the screen's rows).
MEASURES = ("gold_logprob_change", "kl", "correct_change")


@dataclass(frozen=True)
class ScreenedFeature:
    """One feature of one site's SAE and the value a clamp sets it to (NaN: never active, not clamped)."""

    site: str
    feature: int
    clamp_value: float

    @property
    def id(self) -> str:
        return feature_id(self.site, self.feature)


@torch.no_grad()
def site_activations(
    model: CODIModel,
    sae: SAE,
    questions: Sequence[str],
    *,
    n_latents: int = 6,
    batch_size: int = 64,
    progress: bool = False,
) -> Float[Tensor, "n d_sae"]:
    """The SAE's feature activations at its own site on each question (the SAE spliced in with its error
    term; the loop run only as far as the site's thought), ``[n_questions, d_sae]`` float32 on the CPU; with
    ``progress``, under a bar that moves per transformer block."""
    desc = f"activations {sae_site(sae).id}"
    batches = batches_heard(questions, batch_size, model=model, desc=desc, progress=progress)
    return torch.cat(
        [torch.from_numpy(target_activation(model, b, sae, None, [sae], n_latents=n_latents)) for b in batches]
    )


def screened_features(
    site: str, acts: Float[Tensor, "n d_sae"], *, quantile: float = 0.99, top_frequent: int | None = None
) -> list[ScreenedFeature]:
    """The features of one SAE to screen: every feature active on at least one problem (``live``), or the
    ``top_frequent`` most often active of them; each with its clamp value, the ``quantile`` of its activations
    where it is active."""
    active = acts > 0
    frequency = active.float().mean(0)
    live = torch.nonzero(frequency > 0).flatten().tolist()
    if top_frequent is not None:
        live = sorted(live, key=lambda f: (-float(frequency[f]), f))[:top_frequent]
    chosen = []
    for f in sorted(live):
        values = acts[active[:, f], f].double().numpy()
        chosen.append(ScreenedFeature(site, f, float(np.quantile(values, quantile))))
    return chosen


@dataclass
class UneditedRun:
    """The unedited run of a block of problems: the answers, the gold numbers to teacher-force, and which
    problems can be scored (their answer has a number to replace with the gold one)."""

    predictions: list[float | None]
    numbers: list[AnswerNumber]
    scored: list[bool]

    @classmethod
    def of(cls, model: CODIModel, problems: Sequence[Problem], answer_tokens: Sequence[Sequence[int]]) -> UneditedRun:
        """The gold number after the model's own answer prefix; where the model's answer has no number (an
        untrained checkpoint), after its method's answer template (CODI: ``The answer is: 18``)."""
        _, predictions = model.decode_answers(answer_tokens)
        numbers = [
            gold_number(model.tokenizer, t, p.gold) or gold_number(model.tokenizer, _template(model, p.gold), p.gold)
            for p, t in zip(problems, answer_tokens)
        ]
        scored = [n is not None for n in numbers]
        stand_in = AnswerNumber(0, (), model.codi_tokens.eos, "")  # teacher-forced but never read
        return cls(predictions, [n if n is not None else stand_in for n in numbers], scored)


def _template(model: CODIModel, gold: float) -> list[int]:
    return model.tokenizer(model.latent_loop.answer_text(gold), add_special_tokens=False)["input_ids"]


def screen_ops(ops: Sequence[str]) -> list[str]:
    """The edits run for ``ops``: a clamp always comes with its control (:data:`CONTROL`)."""
    unknown = [op for op in ops if op not in SCREEN_OPS]
    if unknown:
        raise ValueError(f"unknown screen op {unknown[0]!r}; the ops are {', '.join(SCREEN_OPS)}")
    return [*ops, CONTROL] if "clamp" in ops else list(ops)


def control_seed(feature: ScreenedFeature) -> int:
    """The seed of a feature's random-direction control (fixed by its id, so reruns and blocks agree)."""
    return int(hashlib.sha256(feature.id.encode()).hexdigest()[:8], 16)


def edit_hooks(model: CODIModel, sae: SAE, feature: ScreenedFeature, op: str, before: Float[Tensor, " batch"]) -> Hooks:
    """The hooks of one screened edit: ablate, clamp to the feature's clamp value, or the clamp's control."""
    if op == CONTROL:
        return random_direction_edit(model, sae, feature.feature, feature.clamp_value, before, control_seed(feature))
    return feature_edit(sae, [feature.feature], op, 0.0 if op == "ablate" else feature.clamp_value)


def screen_block(
    model: CODIModel,
    sae: SAE,
    problems: Sequence[Problem],
    features: Sequence[ScreenedFeature],
    *,
    ops: Sequence[str] = SCREEN_OPS,
    n_latents: int = 6,
    max_new_tokens: int = 32,
    max_rows: int = 256,
) -> pd.DataFrame:
    """Every (feature, op) edit on one block of problems, as branches from the trunk cut at the SAE's thought:
    one row per (feature, op, problem) with ``feature_id, site, feature, op, value, problem_id, active,
    activation`` and the :data:`MEASURES` (NaN where no gold answer number could be written out, see
    :class:`UneditedRun`; exactly 0 for an ablation where the feature is inactive, which changes nothing).
    ``max_rows``: at most this many rows (edits x problems) in one forward."""
    site = sae_site(sae)
    questions = [p.question for p in problems]
    recorder, hooks = feature_recorder(model, [sae])
    with attached(model, [sae], use_error_term=True):
        with model.hooks(fwd_hooks=hooks, reset_hooks_end=True):
            trunk = grow_trunk(model, questions, n_latents=n_latents, through=site.thought)
        acts = recorded_features(recorder, sae).float().cpu()
        edits = [(f, op) for f in features for op in screen_ops(ops) if op == "ablate" or not np.isnan(f.clamp_value)]
        reference = run_branches(model, trunk, [Branch((), site.thought)], max_new_tokens=max_new_tokens)[0]
        unedited = UneditedRun.of(model, problems, reference.answer_tokens)
        forced, rows, mask = whole_number_rows(unedited.numbers)
        branches = [Branch((), site.thought)] + [
            Branch(edit_hooks(model, sae, f, op, acts[:, f.feature]), site.thought) for f, op in edits
        ]
        outputs = run_branches(
            model, trunk, branches, forced, answer_index=rows, max_new_tokens=max_new_tokens, max_rows=max_rows
        )
    base = outputs[0]
    base_logprob = number_logprob(base.logits, unedited.numbers, mask)
    _, base_predictions = model.decode_answers(base.answer_tokens)
    scored = torch.tensor(unedited.scored)
    base_correct = np.array([is_correct(x, p.gold) for x, p in zip(base_predictions, problems)], dtype=float)
    frames = []
    for (feature, op), output in zip(edits, outputs[1:]):
        change = (number_logprob(output.logits, unedited.numbers, mask) - base_logprob).cpu()
        kl = kl_divergence(base.logits[:, 0], output.logits[:, 0]).cpu()
        _, predictions = model.decode_answers(output.answer_tokens)
        correct = np.array([is_correct(x, p.gold) for x, p in zip(predictions, problems)], dtype=float)
        active = acts[:, feature.feature] > 0
        untouched = ~active if op == "ablate" else torch.zeros_like(active)
        change, kl = (torch.where(untouched, 0.0, x.double()) for x in (change, kl))
        correct_change = np.where(untouched.numpy(), 0.0, correct - base_correct)
        frames.append(
            pd.DataFrame(
                {
                    "feature_id": feature.id,
                    "site": site.id,
                    "feature": feature.feature,
                    "op": op,
                    "value": 0.0 if op == "ablate" else feature.clamp_value,
                    "problem_id": [p.id for p in problems],
                    "active": active.numpy(),
                    "activation": acts[:, feature.feature].numpy(),
                    "gold_logprob_change": torch.where(scored, change, float("nan")).numpy(),
                    "kl": torch.where(scored, kl, float("nan")).numpy(),
                    "correct_change": correct_change,
                }
            )
        )
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["feature_id", "op"])


def t_test_pvalue(values: np.ndarray) -> float:
    """Two-sided one-sample t-test that the mean of ``values`` is 0 (NaNs dropped); 1.0 when every value is 0
    (nothing moved), NaN with fewer than two values."""
    data = values[~np.isnan(values)]
    if len(data) < 2:
        return float("nan")
    if not np.any(data):
        return 1.0
    if np.all(data == data[0]):
        return 0.0
    return float(scipy.stats.ttest_1samp(data, 0.0).pvalue)


def summarise_screen(
    rows: pd.DataFrame, *, measure: str = "gold_logprob_change", alpha: float = 0.05, min_problems: int = MIN_PROBLEMS
) -> pd.DataFrame:
    """One row per (feature, op), controls folded into their clamp: ``feature_id, site, feature, op, value, n,
    frequency`` (share of problems where the feature is active), the mean of each measure (``mean_*``), and the
    tested effect on ``measure``: for an ablation its change over the problems where the feature is active (it
    changes nothing elsewhere; averaging those zeros in would only dilute it); for a clamp, over every problem,
    its change minus its control's on the same problem (``control_mean``: the control's mean change), so a
    clamp passes only by doing more than a push of its size in a random direction. Then ``effect`` (mean) with
    its 95% bootstrap CI ``low``/``high`` over problems, ``cohens_d`` (d_z of the per-problem effect),
    ``p_value`` (one-sample t-test) and ``q_value`` / ``significant`` (Benjamini-Hochberg across every row, at
    ``alpha``). ``n`` counts the problems tested; a cell with fewer than ``min_problems`` (a feature active on a
    handful of problems) gets no d and no p-value and is left out of the correction (two nearly equal changes make a
    t-test "significant" and a d in the thousands, and say nothing)."""
    controls = rows[rows["op"] == CONTROL].set_index(["feature_id", "problem_id"])[measure]
    out = []
    for (fid, op), group in rows[rows["op"] != CONTROL].groupby(["feature_id", "op"], sort=True):
        frequency = float(group["active"].mean())
        if op == "ablate":
            group = group[group["active"].astype(bool)]
        values = group[measure].to_numpy(dtype=float)
        control_mean = float("nan")
        if op == "clamp" and len(controls):
            control = controls.loc[fid].reindex(group["problem_id"]).to_numpy(dtype=float)
            control_mean = float(np.nanmean(control)) if np.any(~np.isnan(control)) else float("nan")
            values = values - control
        effect, low, high = bootstrap_ci(values)
        tested = values[~np.isnan(values)]
        enough = len(tested) >= min_problems
        first = group.iloc[0]
        out.append(
            {
                "feature_id": fid,
                "site": first["site"],
                "feature": int(first["feature"]),
                "op": op,
                "value": float(first["value"]),
                "n": len(tested),
                "frequency": frequency,
                **{f"mean_{m}": float(group[m].mean()) for m in MEASURES},
                "control_mean": control_mean,
                "effect": effect,
                "low": low,
                "high": high,
                "cohens_d": (cohens_d(tested) if np.any(tested) else 0.0) if enough else float("nan"),
                "p_value": t_test_pvalue(tested) if enough else float("nan"),
            }
        )
    summary = pd.DataFrame(out)
    if len(summary):
        summary["significant"], summary["q_value"] = benjamini_hochberg(summary["p_value"].to_numpy(), alpha)
    return summary


def select_causal(summary: pd.DataFrame, *, top_per_site: int = 50, min_effect: float = MIN_EFFECT) -> pd.DataFrame:
    """The causal features: those with an edit whose q-value passes (``significant``) and whose mean effect is at
    least ``min_effect`` nats, ranked within their site by the largest |d| among those edits, the first
    ``top_per_site`` of each site kept. One row per
    feature: ``feature_id, site, feature, best_op, cohens_d, q_value, rank`` (0 = strongest in its site)."""
    passing = summary[summary["significant"].astype(bool) & (summary["effect"].abs() >= min_effect)].copy()
    if passing.empty:
        return pd.DataFrame(columns=["feature_id", "site", "feature", "best_op", "cohens_d", "q_value", "rank"])
    passing["abs_d"] = passing["cohens_d"].abs()
    best = passing.sort_values(["abs_d", "feature_id"], ascending=[False, True], kind="stable")
    best = best.drop_duplicates("feature_id").rename(columns={"op": "best_op"})
    best["rank"] = best.groupby("site").cumcount()
    kept = best[best["rank"] < top_per_site]
    columns = ["feature_id", "site", "feature", "best_op", "cohens_d", "q_value", "rank"]
    return kept[columns].sort_values(["site", "rank"]).reset_index(drop=True)


@dataclass
class Screen:
    """What :func:`screen_features` produced.

    Attributes:
        rows: one row per (feature, op, problem) (:func:`screen_block`).
        summary: one row per (feature, op) (:func:`summarise_screen`), with ``live`` and ``selected``.
        causal: the selected features (:func:`select_causal`).
        features: per site, every feature's frequency on the screened problems (``feature_id, site, feature,
            frequency, live, screened``): the denominator of "how many passed".
    """

    rows: pd.DataFrame
    summary: pd.DataFrame
    causal: pd.DataFrame
    features: pd.DataFrame


def screen_features(
    model: CODIModel,
    saes: Mapping[str, SAE],
    problems: list[Problem],
    out: str | Path,
    *,
    ops: Sequence[str] = SCREEN_OPS,
    quantile: float = 0.99,
    top_frequent: int | None = None,
    top_per_site: int = 50,
    alpha: float = 0.05,
    min_problems: int = MIN_PROBLEMS,
    min_effect: float = MIN_EFFECT,
    n_latents: int = 6,
    max_new_tokens: int = 32,
    block_size: int = 50,
    max_rows: int = 256,
    settings: dict[str, Any] | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> tuple[Screen, ResultStore]:
    """The causal screen (see the module docstring) of ``saes`` (site id -> SAE,
    :func:`~codi_lens.saes.ids.saes_by_site`) on ``problems``, resumable in ``out``: one unit of the store per
    (site, block of ``block_size`` problems). Features are chosen and clamp values set from the activations on
    all ``problems`` first (``top_frequent``: only the most frequent live ones)."""
    store = ResultStore(out, settings or {}, overwrite=overwrite)
    questions = [p.question for p in problems]
    chosen: dict[str, list[ScreenedFeature]] = {}
    frames = []
    for site, sae in saes.items():
        acts = site_activations(model, sae, questions, n_latents=n_latents, progress=progress)
        chosen[site] = screened_features(site, acts, quantile=quantile, top_frequent=top_frequent)
        frequency = (acts > 0).float().mean(0).numpy()
        screened = {f.feature for f in chosen[site]}
        frames.append(
            pd.DataFrame(
                {
                    "feature_id": [feature_id(site, f) for f in range(acts.shape[1])],
                    "site": site,
                    "feature": np.arange(acts.shape[1]),
                    "frequency": frequency,
                    "live": frequency > 0,
                    "screened": [f in screened for f in range(acts.shape[1])],
                }
            )
        )
    features = pd.concat(frames, ignore_index=True)
    blocks = [(site, first) for site in saes for first in range(0, len(problems), block_size)]

    def work(batch: list[tuple[str, int]]) -> pd.DataFrame:
        parts = []
        for site, first in batch:
            rows = screen_block(
                model,
                saes[site],
                problems[first : first + block_size],
                chosen[site],
                ops=ops,
                n_latents=n_latents,
                max_new_tokens=max_new_tokens,
                max_rows=max_rows,
            )
            parts.append(rows.assign(**{UNIT_COLUMN: f"{site}/{first}"}))
        return pd.concat(parts, ignore_index=True)

    rows = store.run(
        blocks,
        work,
        unit_id=lambda u: f"{u[0]}/{u[1]}",
        batch_size=1,
        desc="screen",
        unit="edit",
        size=lambda u: len(chosen[u[0]]) * len(screen_ops(ops)) * len(problems[u[1] : u[1] + block_size]),
        model=model,
        progress=progress,
    ).drop(columns=UNIT_COLUMN)
    summary = summarise_screen(rows, alpha=alpha, min_problems=min_problems)
    causal = select_causal(summary, top_per_site=top_per_site, min_effect=min_effect)
    if len(summary):
        summary["selected"] = summary["feature_id"].isin(causal["feature_id"])
    return Screen(rows, summary, causal, features), store


def named_features(spec: str, screen: str | Path) -> list[str]:
    """The feature ids ``spec`` names, for the commands that follow a screen: ``causal`` (the selection in
    ``screen/causal.parquet``), ``strongest:N`` (per site, the N features of ``screen/summary.parquet`` with the
    largest |Cohen's d| over their edits, passing or not; untested ones last) or comma-separated ids
    (``site/feature``). ``SAEError`` names what is missing or malformed."""
    screen = Path(screen)
    if spec.startswith("strongest:"):
        count, summary = spec.partition(":")[2], screen / "summary.parquet"
        if not count.isdigit() or not summary.exists():
            raise SAEError(f"{spec}: give strongest:N with N a number, and a screen folder with summary.parquet")
        table = pd.read_parquet(summary)
        table = table.assign(strength=table["cohens_d"].abs())
        ranked = table.sort_values(
            ["strength", "feature_id"], ascending=[False, True], kind="stable", na_position="last"
        )
        ranked = ranked.drop_duplicates("feature_id")
        return ranked.groupby("site", sort=True).head(int(count))["feature_id"].tolist()
    if spec == "causal":
        causal = screen / "causal.parquet"
        if not causal.exists():
            raise SAEError(f"causal: {causal} does not exist (run python -m experiments.feature_screen first)")
        ids = pd.read_parquet(causal)["feature_id"].tolist()
        if not ids:
            raise SAEError(f"causal: the screen in {screen} selected no feature")
        return ids
    ids = [i.strip() for i in spec.split(",") if i.strip()]
    for text in ids:
        parse_feature_id(text)
    return ids
