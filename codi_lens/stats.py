"""Statistics over results: bootstrap confidence intervals over problems (``scipy.stats.bootstrap``), per
value or clustered by problem, and tables of means with their CIs.

Rows of a result table are clustered by problem (one problem gives one row per condition, thought or cell),
so every interval here resamples problems, never rows."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
from scipy import stats


def _percentile_interval(
    data: np.ndarray, statistic: Callable, vectorized: bool, confidence: float, n_resamples: int, seed: int
) -> tuple[float, float]:
    """``scipy.stats.bootstrap``'s percentile interval of ``statistic`` over resamples of ``data``."""
    result = stats.bootstrap(
        (data,),
        statistic,
        confidence_level=confidence,
        n_resamples=n_resamples,
        method="percentile",
        random_state=np.random.default_rng(seed),
        vectorized=vectorized,
    )
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


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

    def along_axis(x: np.ndarray, axis: int) -> np.ndarray:
        return np.apply_along_axis(statistic, axis, x)

    return (estimate, *_percentile_interval(data, along_axis, True, confidence, n_resamples, seed))


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

    return (estimate, *_percentile_interval(np.arange(len(members)), resampled, False, confidence, n_resamples, seed))
