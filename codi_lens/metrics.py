"""Answer metrics: tensor-level (KL, logit difference, recovery) and over result frames (accuracy,
importance, bootstrap confidence intervals over problems).

"At the answer" means the position predicting the FIRST token of the answer number, teacher-forced
on the reference run's own answer tokens before it (``"The answer is: "``), not the first position
after EOT, which always predicts the same word. The answer number is the last number of the
reference answer text (upstream's rule). :func:`find_answer_number` finds that token for any
tokenizer, including ones that split a number into several tokens; :func:`logits_at_answer` runs the
latent loop (with any intervention) and returns the logits there.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from scipy import stats
from torch import Tensor

from codi_lens.answers import NUMBER_PATTERN


# ---------------------------------------------------------------------- tensor-level
def kl_divergence(
    reference_logits: Float[Tensor, "batch d_vocab"], other_logits: Float[Tensor, "batch d_vocab"]
) -> Float[Tensor, " batch"]:
    """``KL(reference || other)`` in nats over the full vocabulary, per row (computed in float64)."""
    log_p = reference_logits.double().log_softmax(-1)
    log_q = other_logits.double().log_softmax(-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def logit_difference(
    logits: Float[Tensor, "batch d_vocab"], token_a: Int[Tensor, " batch"], token_b: Int[Tensor, " batch"]
) -> Float[Tensor, " batch"]:
    """``logit[token_a] - logit[token_b]`` per row (e.g. clean minus corrupted answer token)."""
    rows = torch.arange(logits.shape[0], device=logits.device)
    return (logits[rows, token_a.to(logits.device)] - logits[rows, token_b.to(logits.device)]).double()


def normalised_recovery(patched, corrupted, clean):
    """``(patched - corrupted) / (clean - corrupted)``, elementwise; NaN where ``clean == corrupted``.

    Accepts tensors, arrays or scalars (returns a float64 NumPy array or scalar).
    """
    patched, corrupted, clean = (np.asarray(_numpy(x), dtype=np.float64) for x in (patched, corrupted, clean))
    denominator = clean - corrupted
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(denominator == 0, np.nan, (patched - corrupted) / np.where(denominator == 0, 1, denominator))


def _numpy(x):
    return x.detach().cpu().numpy() if isinstance(x, Tensor) else x


def classify_answer(prediction: float | None, clean_answer: float, corrupted_answer: float) -> str:
    """``"clean"``, ``"corrupted"`` or ``"other"`` (no number, or a third value)."""
    if prediction is not None and prediction == clean_answer:
        return "clean"
    if prediction is not None and prediction == corrupted_answer:
        return "corrupted"
    return "other"


# ---------------------------------------------------------------------- the answer-number position
@dataclass(frozen=True)
class AnswerNumber:
    """Where a reference answer's number starts, in its own tokens.

    Attributes:
        index: the answer token that starts the last number of the text (``answer:index``); the
            logits predicting it come from the position before (EOT for index 0).
        prefix: the answer tokens before it (``answer_tokens[:index]``), fed when teacher forcing.
        token: the number's first token id.
        text: the number as written (``"18"``).
    """

    index: int
    prefix: tuple[int, ...]
    token: int
    text: str


def find_answer_number(tokenizer, answer_tokens: Sequence[int]) -> AnswerNumber | None:
    """The first token of the last number in ``decode(answer_tokens)`` (special tokens skipped), or
    None when the text has no number.

    Works for any tokenizer by decoding growing prefixes: token ``i`` covers the characters between
    ``len(decode(tokens[:i]))`` and ``len(decode(tokens[:i + 1]))``; the number's first token is the
    one covering its first character (a leading space or a split number is handled the same way).
    """
    tokens = list(answer_tokens)
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    matches = list(NUMBER_PATTERN.finditer(text))
    if not matches:
        return None
    number = matches[-1]
    for i in range(len(tokens)):
        end = len(tokenizer.decode(tokens[: i + 1], skip_special_tokens=True))
        if end > number.start():
            return AnswerNumber(index=i, prefix=tuple(tokens[:i]), token=tokens[i], text=number.group())
    return None  # pragma: no cover - the number lies inside the decoded text


def logits_at_answer(
    model,
    questions: Sequence[str],
    numbers: Sequence[AnswerNumber],
    *,
    n_latents: int = 6,
    fwd_hooks: Sequence[tuple] = (),
) -> Float[Tensor, "batch d_vocab"]:
    """Logits predicting each reference answer's number, after the latent loop under ``fwd_hooks``.

    Teacher-forces ``number.prefix + [number.token]`` (the reference run's own tokens), and returns
    the row predicting ``number.token`` (float32, on the model's device).
    """
    scores = model.score_answers(list(questions), forced_answers(numbers), n_latents=n_latents, fwd_hooks=fwd_hooks)
    return rows_at_answer(scores.logits, numbers)


def forced_answers(numbers: Sequence[AnswerNumber]) -> list[list[int]]:
    """The answer tokens to teacher-force for each number: its prefix and its first token."""
    return [list(n.prefix) + [n.token] for n in numbers]


def rows_at_answer(
    logits: Float[Tensor, "batch answer_pos d_vocab"], numbers: Sequence[AnswerNumber]
) -> Float[Tensor, "batch d_vocab"]:
    """The row of teacher-forced answer logits predicting each number's first token (float32)."""
    rows = torch.arange(len(numbers), device=logits.device)
    index = torch.tensor([n.index for n in numbers], device=logits.device)
    return logits[rows, index].float()


# ---------------------------------------------------------------------- frame-level
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


def bootstrap_ci(
    values: Sequence[float] | np.ndarray,
    statistic: Callable[[np.ndarray], float] = np.mean,
    *,
    confidence: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
) -> tuple[float, float, float]:
    """``(estimate, low, high)``: ``statistic`` of one value per problem and its percentile bootstrap
    CI (``scipy.stats.bootstrap``, resampling problems). NaNs are dropped; fewer than two values give
    NaN bounds; a constant sample gives a zero-width interval."""
    data = np.asarray(values, dtype=np.float64)
    data = data[~np.isnan(data)]
    if len(data) == 0:
        return float("nan"), float("nan"), float("nan")
    estimate = float(statistic(data))
    if len(data) < 2:
        return estimate, float("nan"), float("nan")
    if np.all(data == data[0]):
        return estimate, estimate, estimate
    result = stats.bootstrap(
        (data,),
        lambda x, axis: np.apply_along_axis(statistic, axis, x),
        confidence_level=confidence,
        n_resamples=n_resamples,
        method="percentile",
        random_state=np.random.default_rng(seed),
        vectorized=True,
    )
    return estimate, float(result.confidence_interval.low), float(result.confidence_interval.high)


def mean_ci_table(rows: pd.DataFrame, by: Sequence[str], value: str) -> pd.DataFrame:
    """Per group of ``by``: ``n``, the ``mean`` of ``value`` and its 95% bootstrap CI (``low``,
    ``high``), with one row per problem or pair in each group (see :func:`bootstrap_ci`)."""
    out = []
    for key, group in rows.groupby(list(by), dropna=False, sort=True):
        mean, low, high = bootstrap_ci(group[value].to_numpy(dtype=float))
        keys = dict(zip(by, key if isinstance(key, tuple) else (key,)))
        out.append({**keys, "n": len(group), "mean": mean, "low": low, "high": high})
    return pd.DataFrame(out)


def clustered_bootstrap_ci(
    frame: pd.DataFrame,
    statistic: Callable[..., float],
    columns: Sequence[str],
    *,
    cluster: str = "problem_id",
    confidence: float = 0.95,
    n_resamples: int = 1000,
    seed: int = 0,
) -> tuple[float, float, float]:
    """``(estimate, low, high)`` of ``statistic(*arrays)`` (one NumPy array per name in ``columns``)
    with a percentile bootstrap that resamples whole clusters (problems), so rows of one problem move
    together (``scipy.stats.bootstrap`` over cluster indices). Fewer than two clusters give NaN bounds."""
    if len(frame) == 0:
        return float("nan"), float("nan"), float("nan")
    arrays = [frame[c].to_numpy() for c in columns]
    codes, _ = pd.factorize(frame[cluster], sort=False)
    order = np.argsort(codes, kind="stable")
    starts = np.searchsorted(codes[order], np.arange(codes.max() + 2))
    members = [order[starts[i] : starts[i + 1]] for i in range(len(starts) - 1)]
    estimate = float(statistic(*arrays))
    if len(members) < 2:
        return estimate, float("nan"), float("nan")

    def resampled(chosen: np.ndarray) -> float:
        rows = np.concatenate([members[int(i)] for i in chosen])
        return float(statistic(*(a[rows] for a in arrays)))

    result = stats.bootstrap(
        (np.arange(len(members)),),
        resampled,
        confidence_level=confidence,
        n_resamples=n_resamples,
        method="percentile",
        random_state=np.random.default_rng(seed),
        vectorized=False,
    )
    return estimate, float(result.confidence_interval.low), float(result.confidence_interval.high)


def importance_table(results: pd.DataFrame, by: Sequence[str] = ("intervention", "scope", "thought")) -> pd.DataFrame:
    """Step importance per condition with 95% bootstrap CIs over problems.

    ``results`` has one row per (problem, condition) with ``baseline_correct``, ``correct``,
    ``prediction``, ``baseline_prediction`` and ``kl``. Per group of ``by``:

    - ``importance``: share of problems right at baseline and wrong under the intervention;
    - ``accuracy_drop``: baseline accuracy minus accuracy (can be negative);
    - ``answer_changed``: share whose prediction differs from the baseline's;
    - ``kl``: mean KL(baseline || intervened) at the answer, nats;

    each with ``_low`` / ``_high`` bounds.
    """
    frame = results.assign(
        _importance=(results["baseline_correct"] & ~results["correct"]).astype(float),
        _drop=results["baseline_correct"].astype(float) - results["correct"].astype(float),
        _changed=~_same_prediction(results["prediction"], results["baseline_prediction"]),
    )
    rows = []
    for key, group in frame.groupby(list(by), sort=True):
        row = dict(zip(by, key if isinstance(key, tuple) else (key,)))
        row["n"] = len(group)
        for name, column in (
            ("importance", "_importance"),
            ("accuracy_drop", "_drop"),
            ("answer_changed", "_changed"),
            ("kl", "kl"),
        ):
            estimate, low, high = bootstrap_ci(group[column].astype(float).to_numpy())
            row.update({name: estimate, f"{name}_low": low, f"{name}_high": high})
        rows.append(row)
    return pd.DataFrame(rows)


def _same_prediction(a: pd.Series, b: pd.Series) -> pd.Series:
    """Equal predictions, two missing answers counting as equal."""
    return (a == b) | (a.isna() & b.isna())
