"""Statistics over seeds, in one place: mean and sample std, Welch's t test (two-sided and one-sided, with a
margin, and both one-sided ways at once), Holm's adjustment, the least-squares line (weighted or not) with
t-quantile intervals for its slope, and the inverse-prediction (Fieller) interval of where a fitted line
meets a level. Pure functions of lists of floats; scipy supplies the t distribution."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

ALTERNATIVES = ("two-sided", "greater", "less")


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (ddof=1, as the challenge's records report it); the std
    is None for fewer than two values, both are None for none."""
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def t_quantile(probability: float, df: float) -> float:
    """The t distribution's quantile: t_quantile(0.975, df) is the half-width factor of a 95% interval."""
    from scipy import stats  # scipy is heavy: loaded on the first test, not at import

    return float(stats.t.ppf(probability, df))


# ---------------------------------------------------------------------------- Welch's t test


@dataclass(frozen=True)
class Welch:
    """Welch's unequal-variance t test of mean(a) - mean(b) against a margin."""

    difference: float  # mean(a) - mean(b)
    t: float
    df: float
    p: float
    alternative: str
    margin: float


def welch(
    a: list[float], b: list[float], alternative: str = "two-sided", margin: float = 0.0
) -> Welch | None:
    """Welch's t test of H0: mean(a) - mean(b) = margin against `alternative`: "two-sided" (!= margin),
    "greater" (> margin) or "less" (< margin). None where it cannot be computed: a sample with fewer than
    two values (no variance estimate), or both samples without spread."""
    if alternative not in ALTERNATIVES:
        raise ValueError(f"alternative {alternative!r}: expected one of {', '.join(ALTERNATIVES)}")
    if len(a) < 2 or len(b) < 2:
        return None
    if statistics.variance(a) + statistics.variance(b) == 0:
        return None
    from scipy import stats

    shifted = [v - margin for v in a]  # H1 "greater": mean(a) - margin > mean(b)
    test = stats.ttest_ind(shifted, b, equal_var=False, alternative=alternative)
    difference = statistics.fmean(a) - statistics.fmean(b)
    return Welch(difference, float(test.statistic), float(test.df), float(test.pvalue), alternative, margin)


def welch_both_ways(control: list[float], arm: list[float]) -> dict:
    """One-sided Welch tests both ways for lower-is-better scores: p_better for H1 "the arm's mean is lower
    than the control's", p_worse for H1 "higher" (p_worse = 1 - p_better); t and df of control minus arm;
    improvement = mean(control) - mean(arm). The test is run in the direction the means differ and the
    other p is its complement. None where untestable (n < 2, equal means, zero variance); improvement is
    None only for n < 2."""
    if len(control) < 2 or len(arm) < 2:
        return dict(p_better=None, p_worse=None, t=None, df=None, improvement=None)
    improvement = statistics.fmean(control) - statistics.fmean(arm)
    untested = dict(p_better=None, p_worse=None, t=None, df=None, improvement=improvement)
    if improvement > 0:
        test = welch(control, arm, "greater")
        if test is None:
            return untested
        p_better, t = test.p, test.t
    elif statistics.fmean(arm) - statistics.fmean(control) > 0:
        test = welch(arm, control, "greater")
        if test is None:
            return untested
        p_better, t = 1.0 - test.p, -test.t
    else:  # equal means: neither direction is evidence
        return untested
    return dict(p_better=p_better, p_worse=1.0 - p_better, t=t, df=test.df, improvement=improvement)


def mean_difference(arm: list[float], control: list[float]) -> dict:
    """mean(arm) - mean(control) with its standard error sqrt(s_a^2/n_a + s_c^2/n_c) and the one-sided Welch
    p-values both ways (welch_both_ways: p_better for "the arm's mean is lower"); n = [n_arm, n_control].
    None (n kept) where a side has fewer than two values. None values are left out."""
    a = [v for v in arm if v is not None]
    c = [v for v in control if v is not None]
    if len(a) < 2 or len(c) < 2:
        return dict(gap=None, se=None, p_better=None, p_worse=None, n=[len(a), len(c)])
    tests = welch_both_ways(c, a)
    se = math.sqrt(mean_std(a)[1] ** 2 / len(a) + mean_std(c)[1] ** 2 / len(c))
    return dict(
        gap=mean_std(a)[0] - mean_std(c)[0],
        se=se,
        p_better=tests["p_better"],
        p_worse=tests["p_worse"],
        n=[len(a), len(c)],
    )


def holm(pvalues: dict[str, float | None]) -> dict[str, float | None]:
    """Holm-adjusted p-values over one family of comparisons (None stays None, and is not counted): the
    i-th smallest of m p-values times (m - i + 1), capped at 1 and made monotone."""
    known = sorted((p, k) for k, p in pvalues.items() if p is not None)
    adjusted, running = {k: None for k in pvalues}, 0.0
    for i, (p, k) in enumerate(known):
        running = max(running, min(1.0, (len(known) - i) * p))
        adjusted[k] = running
    return adjusted


# ---------------------------------------------------------------------------- least squares


@dataclass(frozen=True)
class LineFit:
    """y = intercept + slope x by least squares; with weights, the weighted means and sums of squares."""

    intercept: float
    slope: float
    xbar: float  # (weighted) mean of x
    sxx: float  # (weighted) sum of squared deviations of x
    rss: float  # (weighted) residual sum of squares
    n: int

    @property
    def df(self) -> int:
        return self.n - 2

    def slope_se(self, known_variance: bool = False) -> float:
        """The slope's standard error. known_variance: the weights are 1/variance of each y (an inverse-
        variance fit), so the error is 1/sqrt(sxx); otherwise the residual variance rss/(n-2) scales it."""
        if known_variance:
            return 1 / math.sqrt(self.sxx)
        if self.n < 3:
            raise ValueError(f"a residual variance needs 3 points or more, not {self.n}")
        return math.sqrt(self.rss / self.df / self.sxx)

    def slope_interval(self, alpha: float = 0.05, known_variance: bool = False) -> list[float]:
        """The slope's two-sided 1 - alpha interval: the t quantile with n - 2 degrees of freedom from the
        residuals, or the normal quantile when the variances are known (known_variance)."""
        if known_variance:
            from scipy import stats

            factor = float(stats.norm.ppf(1 - alpha / 2))
        else:
            factor = t_quantile(1 - alpha / 2, self.df)
        half = factor * self.slope_se(known_variance)
        return [self.slope - half, self.slope + half]


def line_fit(x: list[float], y: list[float], weights: list[float] | None = None) -> LineFit:
    """Least squares of y on x (weighted when weights are given: e.g. 1/se^2 of each y)."""
    import numpy as np

    if len(x) != len(y) or (weights is not None and len(weights) != len(x)):
        raise ValueError("x, y and weights must have one value per point")
    if len(set(x)) < 2:
        raise ValueError("a line needs two distinct x values")
    xs, ys = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    w = np.ones_like(xs) if weights is None else np.asarray(weights, dtype=float)
    total = float(w.sum())
    xbar = float((w * xs).sum()) / total
    ybar = float((w * ys).sum()) / total
    sxx = float((w * (xs - xbar) ** 2).sum())
    slope = float((w * (xs - xbar) * (ys - ybar)).sum()) / sxx
    intercept = ybar - slope * xbar
    rss = float((w * (ys - intercept - slope * xs) ** 2).sum())
    return LineFit(intercept=intercept, slope=slope, xbar=xbar, sxx=sxx, rss=rss, n=len(xs))


def inverse_prediction(
    fit: LineFit, alpha: float, s2: float, df: int, n_level: int
) -> tuple[float | None, list[float] | None]:
    """Where the line meets 0 (shift the y values by the level first) and its Fieller interval: the x where
    (a + b x)^2 <= t^2 s2 (1/n + (x - xbar)^2/sxx + 1/n_level), t the two-sided 1 - alpha quantile with df
    degrees of freedom, s2 the residual variance (pooled with the level's sample, n_level values).
    -> (the crossing, or None for a flat line; the interval, or None when it is unbounded: the slope is
    not different from 0 at that level)."""
    a, b = fit.intercept, fit.slope
    t = t_quantile(1 - alpha / 2, df)
    k = t * t * s2
    # a quadratic q2 x^2 + q1 x + q0 <= 0
    q2 = b * b - k / fit.sxx
    q1 = 2 * a * b + 2 * k * fit.xbar / fit.sxx
    q0 = a * a - k * (1 / fit.n + fit.xbar**2 / fit.sxx + 1 / n_level)
    crossing = -a / b if b != 0 else None
    if q2 <= 0:
        return crossing, None
    root = math.sqrt(max(q1 * q1 - 4 * q2 * q0, 0.0))
    return crossing, sorted((-q1 + sign * root) / (2 * q2) for sign in (-1, 1))
