"""Statistics over results: bootstrap confidence intervals over problems (``scipy.stats.bootstrap``), per
value or clustered by problem, and tables of means with their CIs; paired contrasts (bootstrap CI, Wilcoxon and
sign tests, Cohen's d), sign-flip permutation p-values and the Benjamini-Hochberg correction across cells
(``statsmodels``).

Rows of a result table are clustered by problem (one problem gives one row per condition, thought or cell),
so every interval here resamples problems, never rows."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats
from statsmodels.stats.multitest import multipletests


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


def benjamini_hochberg(pvalues: Sequence[float] | np.ndarray, alpha: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """``(rejected, q_values)``: the Benjamini-Hochberg false-discovery-rate correction of ``pvalues`` across
    cells (``statsmodels``' ``multipletests``, method ``fdr_bh``). NaN p-values (cells that were not tested)
    stay NaN and are never rejected; the others are corrected among themselves."""
    p = np.asarray(pvalues, dtype=np.float64)
    rejected, q = np.zeros(p.shape, dtype=bool), np.full(p.shape, np.nan)
    tested = ~np.isnan(p)
    if tested.any():
        rejected[tested], q[tested], _, _ = multipletests(p[tested], alpha=alpha, method="fdr_bh")
    return rejected, q


def sign_flip_pvalue(values: Sequence[float] | np.ndarray, *, n_resamples: int = 9999, seed: int = 0) -> float:
    """Two-sided permutation p-value that the mean of ``values`` (one per problem, e.g. a recovery or a paired
    difference) is zero: every value's sign flipped at random (``scipy.stats.permutation_test``,
    ``permutation_type="samples"``; exact when there are at most ``n_resamples`` sign patterns). NaNs are
    dropped; fewer than two values, or all zero, give NaN (nothing to test)."""
    data = np.asarray(values, dtype=np.float64)
    data = data[~np.isnan(data)]
    if len(data) < 2 or not np.any(data):
        return float("nan")
    result = stats.permutation_test(
        (data,),
        lambda x, axis: np.mean(x, axis=axis),
        permutation_type="samples",
        n_resamples=n_resamples,
        alternative="two-sided",
        random_state=np.random.default_rng(seed),
        vectorized=True,
    )
    return float(result.pvalue)


def cohens_d(values: Sequence[float] | np.ndarray) -> float:
    """The standardised mean of one value per problem, ``mean / sd`` (sample sd, ``ddof=1``): for paired
    differences this is Cohen's d_z. NaN with fewer than two values or no spread."""
    data = np.asarray(values, dtype=np.float64)
    data = data[~np.isnan(data)]
    if len(data) < 2:
        return float("nan")
    sd = data.std(ddof=1)
    return float(data.mean() / sd) if sd > 0 else float("nan")


def paired_contrast(
    a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray, *, seed: int = 0
) -> dict[str, float]:
    """``a - b`` on the same problems (one value of each per problem, in the same order): the mean difference
    with its 95% bootstrap CI over problems, Cohen's d_z, the Wilcoxon signed-rank p-value and the exact sign
    test's (``scipy.stats``), and ``n``, the problems both are measured on (a NaN on either side drops the
    problem)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"a paired contrast needs one value of each per problem: {a.shape} against {b.shape}")
    both = ~(np.isnan(a) | np.isnan(b))
    difference = a[both] - b[both]
    mean, low, high = bootstrap_ci(difference, seed=seed)
    nonzero = difference[difference != 0]
    wilcoxon = float(stats.wilcoxon(nonzero).pvalue) if len(nonzero) >= 1 else float("nan")
    positive = int((nonzero > 0).sum())
    sign = float(stats.binomtest(positive, len(nonzero)).pvalue) if len(nonzero) else float("nan")
    return {
        "n": int(both.sum()),
        "mean_difference": mean,
        "low": low,
        "high": high,
        "cohens_d": cohens_d(difference),
        "wilcoxon_p": wilcoxon,
        "sign_p": sign,
    }


def two_sample_difference(
    a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray, *, n_resamples: int = 2000, seed: int = 0
) -> dict[str, float]:
    """``mean(a) - mean(b)`` for two independent samples (two models measured on their own units): the 95%
    percentile bootstrap CI resampling each sample on its own (``scipy.stats.bootstrap``, unpaired), the
    two-sided permutation p-value of the difference (``scipy.stats.permutation_test``), and each ``n``.
    NaNs are dropped; fewer than two values on a side give NaN bounds and p."""
    a, b = (np.asarray(x, dtype=np.float64) for x in (a, b))
    a, b = a[~np.isnan(a)], b[~np.isnan(b)]
    out = {"n_a": len(a), "n_b": len(b), "mean_difference": float("nan"), "low": float("nan"), "high": float("nan")}
    out["p"] = float("nan")
    if len(a) == 0 or len(b) == 0:
        return out
    out["mean_difference"] = float(a.mean() - b.mean())
    if len(a) < 2 or len(b) < 2:
        return out

    def difference(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
        return np.mean(x, axis=axis) - np.mean(y, axis=axis)

    if np.all(np.concatenate([a, b]) == a[0]):
        out.update(low=0.0, high=0.0, p=1.0)
        return out
    interval = stats.bootstrap(
        (a, b), difference, n_resamples=n_resamples, method="percentile", paired=False,
        random_state=np.random.default_rng(seed), vectorized=True,
    ).confidence_interval  # fmt: skip
    permutation = stats.permutation_test(
        (a, b), difference, n_resamples=n_resamples, vectorized=True, random_state=np.random.default_rng(seed)
    )
    out.update(low=float(interval.low), high=float(interval.high), p=float(permutation.pvalue))
    return out


def cluster_permutation_pvalue(
    x: np.ndarray,
    y: np.ndarray,
    statistic: Callable[[np.ndarray, np.ndarray], float],
    *,
    n_resamples: int = 9999,
    seed: int = 0,
) -> float:
    """Two-sided permutation p-value of ``statistic(x, y)`` (e.g. a correlation) when whole clusters are the
    exchangeable units: ``x`` and ``y`` are ``[n_clusters, per_cluster]`` (one row per problem, its values in a
    fixed order, e.g. thoughts 1..n), and the null pairs each problem's ``x`` with another problem's ``y``
    (``scipy.stats.permutation_test``, ``permutation_type="pairings"``; exact when ``n_clusters!`` is at most
    ``n_resamples``). Keeping each row intact keeps the average profile over the row (every problem's thought
    1 against another's thought 1), so only association beyond that profile counts. NaN with fewer than three
    clusters or a NaN statistic."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 2:
        raise ValueError(f"x and y are [n_clusters, per_cluster] of one shape, got {x.shape} and {y.shape}")
    if len(x) < 3 or np.isnan(statistic(x.ravel(), y.ravel())):
        return float("nan")
    rows = np.arange(len(x))  # y's rows are permuted against x's (n! orders); each row stays whole
    result = stats.permutation_test(
        (rows,),
        lambda j: statistic(x.ravel(), y[j].ravel()),
        permutation_type="pairings",
        n_resamples=n_resamples,
        alternative="two-sided",
        random_state=np.random.default_rng(seed),
        vectorized=False,
    )
    return float(result.pvalue)


def pearson(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> float:
    """The Pearson correlation of ``x`` and ``y``; NaN when either side is constant."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(x) < 2 or np.all(x == x[0]) or np.all(y == y[0]):
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def clustered_pearson_ci(
    x: Sequence[float] | np.ndarray,
    y: Sequence[float] | np.ndarray,
    clusters: Sequence[Any] | np.ndarray,
    *,
    confidence: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
) -> tuple[float, float, float]:
    """``(r, low, high)``: the Pearson correlation of ``x`` and ``y`` over every point and its percentile bootstrap
    CI resampling whole clusters (problems: every point of a drawn problem goes together). Vectorised: each
    resample's correlation comes from the clusters' sums weighted by how often each was drawn. NaN bounds with
    fewer than three clusters; NaN ``r`` when either side is constant."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    labels, index = np.unique(np.asarray(clusters), return_inverse=True)
    sums = np.stack(
        [np.bincount(index, w, minlength=len(labels)) for w in (np.ones_like(x), x, y, x * x, y * y, x * y)]
    )

    def from_sums(weighted: np.ndarray) -> np.ndarray:
        n, sx, sy, sxx, syy, sxy = weighted
        cov, vx, vy = sxy - sx * sy / n, sxx - sx * sx / n, syy - sy * sy / n
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where((vx > 1e-300) & (vy > 1e-300), cov / np.sqrt(vx * vy), np.nan)

    estimate = float(from_sums(sums.sum(1)))
    if len(labels) < 3 or np.isnan(estimate):
        return estimate, float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(labels), size=(n_resamples, len(labels)))
    counts = np.stack([np.bincount(row, minlength=len(labels)) for row in draws])  # [resamples, clusters]
    resampled = from_sums(sums @ counts.T)
    tail = (1 - confidence) / 2 * 100
    low, high = np.nanpercentile(resampled, [tail, 100 - tail])
    return estimate, float(low), float(high)
