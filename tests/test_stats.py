"""Confidence intervals and tables of means, against independent references: normal theory for the level of a
percentile bootstrap, the plain bootstrap of cluster means for the clustered bootstrap, and values by hand."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

from codi_lens.metrics import normalised_recovery
from codi_lens.stats import bootstrap_ci, clustered_bootstrap_ci, mean_ci_table

NAN_TRIPLE = (math.nan, math.nan, math.nan)


def same(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    return all((math.isnan(x) and math.isnan(y)) or x == y for x, y in zip(a, b, strict=True))


def test_bootstrap_ci_edge_cases():
    """No value: NaN everywhere; one value: the value, NaN bounds; two values: finite bounds; a constant sample:
    a zero-width interval; NaN and None are dropped before anything is computed."""
    assert same(bootstrap_ci([]), NAN_TRIPLE)
    assert same(bootstrap_ci([math.nan, math.nan]), NAN_TRIPLE)
    assert same(bootstrap_ci([4.0]), (4.0, math.nan, math.nan))
    estimate, low, high = bootstrap_ci([1.0, 3.0])
    assert estimate == 2.0 and 1.0 <= low < high <= 3.0
    assert bootstrap_ci([2.5, 2.5, 2.5]) == (2.5, 2.5, 2.5)
    values = [1.0, None, 2.0, math.nan, 6.0]
    assert bootstrap_ci(values) == bootstrap_ci([1.0, 2.0, 6.0])
    assert bootstrap_ci(values)[0] == 3.0


def test_bootstrap_ci_is_seeded_with_documented_defaults():
    """The same call gives the same interval; the defaults are 2000 resamples and seed 0; another seed moves it."""
    values = np.random.default_rng(1).normal(size=50)
    first = bootstrap_ci(values)
    assert bootstrap_ci(values) == first
    assert bootstrap_ci(values, n_resamples=2000, seed=0) == first
    assert bootstrap_ci(values, seed=1) != first
    # the same draw as SciPy's percentile bootstrap called with 2000 resamples from default_rng(0)
    scipy_ci = stats.bootstrap(
        (values,), np.mean, n_resamples=2000, method="percentile", random_state=np.random.default_rng(0)
    ).confidence_interval
    assert first[1:] == (pytest.approx(scipy_ci.low, abs=1e-12), pytest.approx(scipy_ci.high, abs=1e-12))


@pytest.mark.parametrize("confidence", [0.95, 0.90])
def test_bootstrap_ci_level_matches_normal_theory(confidence):
    """For the mean of 400 normal values the percentile bootstrap interval is mean +/- z * sd / sqrt(n) (sd with
    ddof 0, the bootstrap's own spread) up to Monte Carlo error (about 3% of the half-width at 2000 resamples). The
    tolerance, 6%, is well inside the 16% between the 90% and 95% half-widths, so a wrong level fails."""
    values = np.random.default_rng(0).normal(10.0, 2.0, size=400)
    estimate, low, high = bootstrap_ci(values, confidence=confidence)
    half = stats.norm.ppf(0.5 + confidence / 2) * values.std() / math.sqrt(len(values))
    assert estimate == pytest.approx(values.mean(), abs=1e-12)
    assert abs((high - low) / 2 - half) <= 0.06 * half
    assert abs((high + low) / 2 - values.mean()) <= 0.06 * half


def cluster_frame() -> tuple[pd.DataFrame, np.ndarray]:
    """Three rows per problem, problems interleaved and not in sorted order; returns the rows and the mean of
    each problem in order of first appearance."""
    rng = np.random.default_rng(3)
    ids = ["p7", "p2", "p9", "p4", "p1", "p5", "p8", "p3"]
    order = rng.permutation(np.repeat(np.arange(len(ids)), 3))
    values = rng.normal(size=len(order)) + order  # problems differ in level, rows within one problem vary
    frame = pd.DataFrame({"problem_id": [ids[i] for i in order], "value": values})
    first_seen = list(dict.fromkeys(frame["problem_id"]))
    means = frame.groupby("problem_id")["value"].mean().loc[first_seen].to_numpy()
    return frame, means


def test_clustered_bootstrap_resamples_whole_problems():
    """With equal-sized clusters the mean of the resampled rows is the mean of the resampled cluster means, so the
    clustered interval equals the plain bootstrap of the cluster means (clusters indexed in order of first
    appearance, same seed and resamples) to float rounding."""
    frame, means = cluster_frame()
    for confidence in (0.95, 0.8):
        clustered = clustered_bootstrap_ci(frame, np.mean, ["value"], confidence=confidence, n_resamples=999, seed=4)
        plain = bootstrap_ci(means, confidence=confidence, n_resamples=999, seed=4)
        np.testing.assert_allclose(clustered, plain, rtol=0, atol=1e-12)


def test_clustered_bootstrap_defaults_and_edge_cases():
    """Clusters default to ``problem_id``, 1000 resamples, seed 0; no row: NaN; one cluster: NaN bounds; two:
    finite bounds. One row per problem gives the plain bootstrap of the values."""
    frame, _ = cluster_frame()
    default = clustered_bootstrap_ci(frame, np.mean, ["value"])
    assert default == clustered_bootstrap_ci(frame, np.mean, ["value"], cluster="problem_id", n_resamples=1000, seed=0)
    assert default != clustered_bootstrap_ci(frame, np.mean, ["value"], seed=1)
    assert same(clustered_bootstrap_ci(frame.iloc[:0], np.mean, ["value"]), NAN_TRIPLE)
    one = frame[frame.problem_id == "p2"]
    assert same(clustered_bootstrap_ci(one, np.mean, ["value"]), (one["value"].mean(), math.nan, math.nan))
    two = frame[frame.problem_id.isin(["p2", "p9"])]
    _, low, high = clustered_bootstrap_ci(two, np.mean, ["value"])
    assert math.isfinite(low) and math.isfinite(high) and low < high
    single = frame.drop_duplicates("problem_id")
    np.testing.assert_allclose(
        clustered_bootstrap_ci(single, np.mean, ["value"], n_resamples=500),
        bootstrap_ci(single["value"].to_numpy(), n_resamples=500),
        rtol=0,
        atol=1e-12,
    )


def test_mean_ci_table_by_hand():
    """One row per group in sorted order, a missing group key kept as its own group, ``n`` and ``mean`` by hand
    and the bounds of :func:`bootstrap_ci` on the group's values."""
    rows = pd.DataFrame(
        {
            "layer": [2, 1, 2, 1, np.nan, 2],
            "mode": ["b", "a", "b", "a", "a", "a"],
            "value": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
        }
    )
    table = mean_ci_table(rows, ["layer", "mode"], "value")
    assert table["layer"].fillna(-1).tolist() == [1, 2, 2, -1] and table["mode"].tolist() == ["a", "a", "b", "a"]
    assert table["n"].tolist() == [2, 1, 2, 1] and table["mean"].tolist() == [3.0, 6.0, 2.0, 5.0]
    assert tuple(table.iloc[2][["mean", "low", "high"]]) == bootstrap_ci([1.0, 3.0])


def test_normalised_recovery_by_hand():
    """(patched - corrupted) / (clean - corrupted) in float64 whatever the input dtype, NaN where clean equals
    corrupted without a warning, from tensors that require grad too."""
    patched = torch.tensor([1.0, 2.0, 0.1], requires_grad=True)
    corrupted = torch.tensor([0.0, 1.0, 0.7])
    clean = torch.tensor([3.0, 1.0, 0.3])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = normalised_recovery(patched, corrupted, clean)
    p, c, k = (np.float64(t.detach().numpy()) for t in (patched, corrupted, clean))
    assert out.dtype == np.float64
    assert out[0] == (p[0] - c[0]) / (k[0] - c[0]) and math.isnan(out[1])
    assert out[2] == (p[2] - c[2]) / (k[2] - c[2])  # exact in float64 from the float32 inputs, not float32 maths
    assert normalised_recovery(3, 1, 5) == 0.5 and math.isnan(normalised_recovery(3.0, 2.0, 2.0))


def test_mean_ci_table_drops_missing_values_of_nullable_columns():
    # answer_changed is a nullable boolean where a prediction is missing: <NA> is dropped like NaN
    rows = pd.DataFrame(
        {"condition": ["a"] * 4, "answer_changed": pd.array([True, None, False, True], dtype="boolean")}
    )
    table = mean_ci_table(rows, ["condition"], "answer_changed")
    assert table.loc[0, "n"] == 4
    assert table.loc[0, "mean"] == pytest.approx(2 / 3, abs=1e-12)


def test_benjamini_hochberg_by_hand():
    """q = min over ranks >= r of p_(r) * m / r, NaN cells left out of m: p = 0.01, 0.04, 0.03, 0.2 (m = 4) give
    0.04, 0.04 * 4 / 3, min(0.03 * 4 / 2, 0.04 * 4 / 3), 0.2; at alpha 0.05 only the first survives."""
    from codi_lens.stats import benjamini_hochberg

    rejected, q = benjamini_hochberg([0.01, 0.04, np.nan, 0.03, 0.2])
    np.testing.assert_allclose(q, [0.04, 0.16 / 3, np.nan, 0.16 / 3, 0.2])
    assert rejected.tolist() == [True, False, False, False, False]


def test_sign_flip_pvalue_is_exact_for_few_problems():
    """[1, 2, 3]: of the 8 sign patterns, two (all +, all -) have |mean| >= 2, so p = 2 / 8."""
    from codi_lens.stats import sign_flip_pvalue

    assert sign_flip_pvalue([1.0, 2.0, 3.0]) == pytest.approx(0.25)
    assert sign_flip_pvalue([1.0, -1.0, 2.0, -2.0]) == pytest.approx(1.0)
    assert np.isnan(sign_flip_pvalue([0.0, 0.0, 0.0]))


def test_paired_contrast_by_hand():
    """Differences 1, 1, 1, -1: mean 0.5, sample sd 1 (so d_z = 0.5), three of four positive (two-sided sign
    test 10 / 16); a NaN on one side drops that problem."""
    from codi_lens.stats import paired_contrast

    out = paired_contrast([2.0, 3.0, 1.0, 0.0, np.nan], [1.0, 2.0, 0.0, 1.0, 5.0])
    assert out["n"] == 4
    assert out["mean_difference"] == pytest.approx(0.5)
    assert out["cohens_d"] == pytest.approx(0.5)
    assert out["sign_p"] == pytest.approx(10 / 16)
    assert out["low"] <= 0.5 <= out["high"]
    # Wilcoxon, exact: differences 1, 2, 3, 4, -5 give W- = 5; 10 of the 32 sign patterns have W- <= 5
    # ({}, {1}, ..., {5}, {1,2}, {1,3}, {1,4}, {2,3}), so the two-sided p is 20 / 32.
    out = paired_contrast([1.0, 2.0, 3.0, 4.0, -5.0], [0.0] * 5)
    assert out["wilcoxon_p"] == pytest.approx(20 / 32)


def test_early_versus_late_thoughts_by_hand():
    """Two thoughts (early = 1, late = 2), three problems: KL 1, 2, 3 early and 0 late gives differences 1, 2, 3:
    mean 2, sample sd 1 (d_z = 2), all three positive (two-sided sign test 2 / 8); breaks: none."""
    from codi_lens.reports.importance import early_versus_late

    frame = pd.DataFrame(
        {
            "problem_id": ["a", "a", "b", "b", "c", "c"],
            "intervention": ["zero"] * 6,
            "scope": ["single"] * 6,
            "thought": [1, 2] * 3,
            "baseline_correct": [True] * 6,
            "correct": [True] * 6,
            "kl": [1.0, 0.0, 2.0, 0.0, 3.0, 0.0],
        }
    )
    out = early_versus_late(frame)
    kl = out["zero/kl"]
    assert (kl["early_thoughts"], kl["late_thoughts"], kl["n"]) == ("1-1", "2-2", 3)
    assert kl["mean_difference"] == pytest.approx(2.0) and kl["cohens_d"] == pytest.approx(2.0)
    assert kl["sign_p"] == pytest.approx(0.25)
    assert out["zero/broken"]["mean_difference"] == 0.0
    # A model whose answers hold no number has no KL: the contrast is empty, not an error.
    empty = early_versus_late(frame.assign(kl=np.nan))["zero/kl"]
    assert empty["n"] == 0 and np.isnan(empty["mean_difference"])


def test_cluster_permutation_pvalue_by_hand():
    """Six problems whose y equals x: of the 720 pairings of problems only the identity reaches r = 1, so the
    one-sided tail is 1 / 720 and scipy's two-sided p doubles it: 2 / 720."""
    from codi_lens.stats import cluster_permutation_pvalue

    x = np.arange(12.0).reshape(6, 2)
    r = lambda a, b: float(np.corrcoef(a, b)[0, 1])  # noqa: E731
    assert cluster_permutation_pvalue(x, x, r) == pytest.approx(2 / 720)
    assert np.isnan(cluster_permutation_pvalue(x[:2], x[:2], r))


def test_clustered_pearson_ci_against_a_loop_over_resamples():
    """The vectorised cluster bootstrap against resampling whole clusters one at a time with the same draws."""
    from codi_lens.stats import clustered_pearson_ci

    rng = np.random.default_rng(1)
    clusters = np.repeat(np.arange(30), 4)
    x = rng.normal(size=120) + np.repeat(rng.normal(size=30), 4)
    y = 0.5 * x + rng.normal(size=120)
    r, low, high = clustered_pearson_ci(x, y, clusters, n_resamples=500, seed=3)
    assert r == pytest.approx(np.corrcoef(x, y)[0, 1], abs=1e-12)
    draws = np.random.default_rng(3).integers(0, 30, size=(500, 30))
    by_loop = []
    for draw in draws:
        rows = np.concatenate([np.flatnonzero(clusters == c) for c in draw])
        by_loop.append(np.corrcoef(x[rows], y[rows])[0, 1])
    assert (low, high) == pytest.approx(tuple(np.percentile(by_loop, [2.5, 97.5])), abs=1e-9)
    assert np.isnan(clustered_pearson_ci(x, np.ones_like(x), clusters)[0])


def test_two_sample_difference_by_hand():
    from codi_lens.stats import two_sample_difference

    a, b = np.array([1.0, 2.0, 3.0, 4.0]), np.array([0.0, 0.5, 1.0])
    result = two_sample_difference(a, b, n_resamples=4000)
    assert result["mean_difference"] == 2.5 - 0.5 and (result["n_a"], result["n_b"]) == (4, 3)
    # Every bootstrap mean of a lies in [1, 4] and of b in [0, 1]: the interval lies in [0, 4].
    assert 0.0 <= result["low"] < 2.0 < result["high"] <= 4.0
    # Permutation p by hand: every one of the C(7, 4) = 35 ways to pick a's 4 values; two-sided as twice the
    # smaller tail (the observed split counts in both tails).
    from itertools import combinations

    pooled = np.concatenate([a, b])
    differences = []
    for chosen in combinations(range(7), 4):
        rest = [i for i in range(7) if i not in chosen]
        differences.append(pooled[list(chosen)].mean() - pooled[rest].mean())
    differences = np.array(differences)
    upper, lower = (differences >= 2.0 - 1e-12).mean(), (differences <= 2.0 + 1e-12).mean()
    assert result["p"] == pytest.approx(min(1.0, 2 * min(upper, lower)))
    assert np.isnan(two_sample_difference([1.0], [2.0, 3.0])["low"])
    assert two_sample_difference([np.nan, 1.0, 1.0], [1.0, 1.0])["mean_difference"] == 0.0
