"""tools/stats.py against scipy/numpy references and cases computed by hand."""

import math

import numpy as np
import pytest
from scipy import stats as sps

from tools import stats

A = [2.10, 2.12, 2.09, 2.11]
B = [2.15, 2.13, 2.16]


def test_mean_std_is_the_sample_std_and_none_where_undefined():
    assert stats.mean_std([1.0, 2.0, 3.0, 4.0]) == (2.5, pytest.approx(math.sqrt(5 / 3)))
    assert stats.mean_std([7.0]) == (7.0, None)
    assert stats.mean_std([]) == (None, None)


def test_welch_matches_scipy_two_sided_and_one_sided():
    for alternative in ("two-sided", "less", "greater"):
        reference = sps.ttest_ind(A, B, equal_var=False, alternative=alternative)
        test = stats.welch(A, B, alternative)
        assert test.t == pytest.approx(reference.statistic)
        assert test.df == pytest.approx(reference.df)
        assert test.p == pytest.approx(reference.pvalue)
    assert stats.welch(A, B).difference == pytest.approx(np.mean(A) - np.mean(B))


def test_welch_by_hand():
    # a = [1, 3] (mean 2, var 2), b = [4, 6, 8] (mean 6, var 4): se^2 = 2/2 + 4/3 = 7/3
    test = stats.welch([1.0, 3.0], [4.0, 6.0, 8.0])
    assert test.t == pytest.approx(-4 / math.sqrt(7 / 3))
    # Welch-Satterthwaite: (7/3)^2 / (1^2/1 + (4/3)^2/2)
    assert test.df == pytest.approx((7 / 3) ** 2 / (1 + (4 / 3) ** 2 / 2))
    assert test.p == pytest.approx(2 * sps.t.sf(abs(test.t), test.df))


def test_welch_margin_shifts_the_null():
    # H1: mean(B) - 0.01 > mean(A): the difference is 0.0375, so a margin of 0.01 still leaves evidence,
    # and a margin beyond the difference leaves none
    small = stats.welch(B, A, "greater", margin=0.01)
    reference = sps.ttest_ind([v - 0.01 for v in B], A, equal_var=False, alternative="greater")
    assert small.p == pytest.approx(reference.pvalue)
    assert small.p < 0.05
    assert stats.welch(B, A, "greater", margin=0.05).p > 0.5


def test_welch_is_none_without_a_variance_estimate():
    assert stats.welch([1.0], [1.0, 2.0]) is None
    assert stats.welch([1.0, 1.0], [2.0, 2.0]) is None
    with pytest.raises(ValueError, match="alternative"):
        stats.welch(A, B, "bigger")


def test_welch_both_ways_are_complements_and_match_scipy():
    control, arm = B, A  # the arm is lower: better
    result = stats.welch_both_ways(control, arm)
    better = sps.ttest_ind(control, arm, equal_var=False, alternative="greater")
    assert result["p_better"] == pytest.approx(better.pvalue)
    assert result["p_worse"] == pytest.approx(1 - better.pvalue)
    assert result["t"] == pytest.approx(better.statistic)
    assert result["improvement"] == pytest.approx(np.mean(B) - np.mean(A))
    flipped = stats.welch_both_ways(arm, control)
    assert flipped["p_better"] == pytest.approx(result["p_worse"])
    assert flipped["t"] == pytest.approx(-result["t"])


def test_welch_both_ways_untestable_cases():
    assert stats.welch_both_ways([1.0], [1.0, 2.0])["improvement"] is None
    equal = stats.welch_both_ways([1.0, 3.0], [3.0, 1.0])
    assert equal["p_better"] is None and equal["improvement"] == 0.0
    flat = stats.welch_both_ways([2.0, 2.0], [1.0, 1.0])
    assert flat["p_better"] is None and flat["improvement"] == 1.0


def test_holm_by_hand():
    # sorted 0.01, 0.02, 0.04 (m = 3): 0.03, max(0.03, 0.04) = 0.04, max(0.04, 0.04) = 0.04
    adjusted = stats.holm({"a": 0.04, "b": 0.01, "c": 0.02, "d": None})
    assert adjusted == {
        "a": pytest.approx(0.04),
        "b": pytest.approx(0.03),
        "c": pytest.approx(0.04),
        "d": None,
    }
    # monotone and capped at 1
    assert stats.holm({"a": 0.5, "b": 0.6}) == {"a": 1.0, "b": 1.0}


def test_holm_matches_statsmodels_style_reference():
    pvalues = [0.001, 0.013, 0.04, 0.2, 0.03]
    order = np.argsort(pvalues)
    reference = np.maximum.accumulate([(len(pvalues) - i) * pvalues[j] for i, j in enumerate(order)])
    expected = dict(zip((str(j) for j in order), np.minimum(reference, 1.0)))
    adjusted = stats.holm({str(i): p for i, p in enumerate(pvalues)})
    assert adjusted == {k: pytest.approx(v) for k, v in expected.items()}


def test_line_fit_matches_numpy_and_scipy():
    x = [0.0, 0.2, 0.4, 0.6, 0.8, 1.0, 1.3]
    y = [1.0, 1.3, 1.35, 1.9, 2.0, 2.4, 2.5]
    fit = stats.line_fit(x, y)
    slope, intercept = np.polyfit(x, y, 1)
    assert fit.slope == pytest.approx(slope)
    assert fit.intercept == pytest.approx(intercept)
    reference = sps.linregress(x, y)
    assert fit.slope_se() == pytest.approx(reference.stderr)
    half = sps.t.ppf(0.975, len(x) - 2) * reference.stderr
    assert fit.slope_interval() == pytest.approx([slope - half, slope + half])


def test_weighted_line_fit_matches_numpy_polyfit():
    x, y, se = [1.0, 1.5, 2.0], [0.01, -0.004, 0.006], [0.003, 0.0025, 0.004]
    fit = stats.line_fit(x, y, [1 / s**2 for s in se])
    slope, intercept = np.polyfit(x, y, 1, w=[1 / s for s in se])  # polyfit weights the residuals
    assert fit.slope == pytest.approx(slope)
    assert fit.intercept == pytest.approx(intercept)
    # inverse-variance weights: the slope's variance is 1 / sum(w (x - xbar)^2)
    w = np.array([1 / s**2 for s in se])
    xbar = (w * x).sum() / w.sum()
    assert fit.slope_se(known_variance=True) == pytest.approx(
        1 / math.sqrt((w * (np.array(x) - xbar) ** 2).sum())
    )
    low, high = fit.slope_interval(known_variance=True)
    assert (high - low) / 2 == pytest.approx(sps.norm.ppf(0.975) * fit.slope_se(known_variance=True))


def test_t_interval_is_wider_than_z_at_few_points():
    fit = stats.line_fit([1.0, 2.0, 3.0], [1.0, 2.5, 2.9])
    t_low, t_high = fit.slope_interval()
    assert t_high - t_low == pytest.approx(2 * 12.7062047 * fit.slope_se(), rel=1e-6)  # t(0.975, 1 df)
    with pytest.raises(ValueError, match="3 points"):
        stats.line_fit([1.0, 2.0], [1.0, 2.0]).slope_se()
    with pytest.raises(ValueError, match="distinct"):
        stats.line_fit([1.0, 1.0], [1.0, 2.0])


def test_inverse_prediction_brackets_the_crossing():
    # y = 1 - 2x exactly plus small noise: crosses 0 at x = 0.5; a tight interval around it
    x = [0.0, 0.25, 0.5, 0.75, 1.0]
    y = [1.01, 0.49, 0.0, -0.51, -0.99]
    fit = stats.line_fit(x, y)
    s2 = fit.rss / fit.df
    crossing, interval = stats.inverse_prediction(fit, 0.05, s2, fit.df, n_level=1000000)
    assert crossing == pytest.approx(-fit.intercept / fit.slope)
    assert interval[0] < crossing < interval[1]
    assert interval[1] - interval[0] < 0.05
    # at the interval's ends the line is exactly t * its prediction error away from 0
    t = sps.t.ppf(0.975, fit.df)
    for end in interval:
        error = math.sqrt(s2 * (1 / fit.n + (end - fit.xbar) ** 2 / fit.sxx + 1 / 1000000))
        assert abs(fit.intercept + fit.slope * end) == pytest.approx(t * error)


def test_inverse_prediction_is_unbounded_for_a_flat_line():
    fit = stats.line_fit([0.0, 1.0, 2.0, 3.0], [0.1, -0.2, 0.15, -0.1])
    crossing, interval = stats.inverse_prediction(fit, 0.05, fit.rss / fit.df, fit.df, n_level=3)
    assert interval is None
