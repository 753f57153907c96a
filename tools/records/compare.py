"""compare: the one-sided Welch t-test (scipy.stats) of "the candidate beats the baseline by a margin",
on numbers, a submission.json or a record folder, then both of the challenge's rules."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tools import stats
from tools.stats import mean_std
from tools.records.base import SUBMISSION, RecordError, folder_logs
from tools.records.checks_claims import SEED_KEYS, seed_claims

README_MARGIN, README_ALPHA = 0.005, 0.01  # the README's rule: beat the record by 0.005 nats at p < 0.01
CHRONOLOGICAL_ALPHA = 0.25  # the maintainers' final audit: beat the previous row at one-sided p < 0.25


@dataclass
class Sample:
    label: str
    values: list[float]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return mean_std(self.values)[0]

    @property
    def std(self) -> float | None:
        """Sample standard deviation (ddof=1); None for a single value."""
        return mean_std(self.values)[1]


@dataclass
class WelchResult:
    improvement: float  # baseline mean - candidate mean (lower is better)
    margin: float
    alpha: float
    t: float | None = None
    df: float | None = None
    p: float | None = None
    verdict: str = ""

    @property
    def significant(self) -> bool:
        return self.p is not None and self.improvement > 0 and self.p < self.alpha


def welch_test(baseline: Sample, candidate: Sample, margin: float, alpha: float = 0.01) -> WelchResult:
    """One-sided Welch test of H1: baseline mean - candidate mean > margin."""
    result = WelchResult(baseline.mean - candidate.mean, margin, alpha)
    if result.improvement <= 0:
        result.verdict = f"candidate is worse (improvement {result.improvement:+.6g} <= 0)"
        return result
    if baseline.n < 2 or candidate.n < 2:
        small = ", ".join(f"{s.label} has n={s.n}" for s in (baseline, candidate) if s.n < 2)
        result.verdict = f"cannot be tested: {small}, so there is no variance estimate (run more seeds)"
        return result
    test = stats.welch(baseline.values, candidate.values, alternative="greater", margin=margin)
    if test is None:
        result.verdict = "cannot be tested: both samples have zero variance"
        return result
    result.t = test.t
    result.df = test.df
    result.p = test.p
    if result.p < alpha:
        result.verdict = f"candidate beats baseline by more than the margin at p={result.p:.4g} < {alpha:g}"
    else:
        below = (
            f"; the improvement {result.improvement:.6g} is below the margin"
            if result.improvement <= margin
            else ""
        )
        result.verdict = f"not significant: p={result.p:.4g} >= {alpha:g}{below}"
    return result


def claimed_per_seed(sub: dict, metric: str) -> list[float] | None:
    """The per-seed `metric` of submission.json's top-level seed results, or None when it has none."""
    top = [c for where, _, c in seed_claims(sub) if where in SEED_KEYS]
    values = [c.get(metric) for c in top]
    if not top or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return None
    return [float(v) for v in values]


def logged_per_seed(folder: Path, metric: str) -> tuple[list[float], list[str]]:
    """One score per seed from the folder's logs (the last log in name order where a seed has several)."""
    by_seed: dict = {}
    for fl in folder_logs(folder):
        if fl.run.score is not None:
            by_seed[fl.seed if fl.seed is not None else fl.path.name] = fl
    return [getattr(fl.run.score, metric) for fl in by_seed.values()], [
        fl.path.name for fl in by_seed.values()
    ]


def load_sample(spec: list[str], label: str, metric: str) -> Sample:
    """Numbers, or one submission.json / record folder: its per-seed `metric` as claimed, else the
    scores in its logs (one per seed)."""
    if len(spec) == 1 and Path(spec[0]).exists():
        path = Path(spec[0])
        folder, path = (path, path / SUBMISSION) if path.is_dir() else (path.parent, path)
        try:
            sub = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise RecordError(f"{path}: unreadable ({type(err).__name__}: {err})") from None
        values = claimed_per_seed(sub, metric) if isinstance(sub, dict) else None
        if values:
            return Sample(f"{label} ({metric} per seed of {path})", values)
        values, names = logged_per_seed(folder, metric)
        if not values:
            raise RecordError(
                f"{folder}: no per-seed {metric} in {SUBMISSION} and no log with a final evaluation"
            )
        return Sample(f"{label} ({metric} from the logs of {folder}: {', '.join(names)})", values)
    try:
        return Sample(label, [float(v) for v in spec])
    except ValueError:
        raise RecordError(
            f"--{label} {' '.join(spec)}: expected numbers, a submission.json or a record folder"
        ) from None


def compare(
    baseline: Sequence[str],
    candidate: Sequence[str],
    *,
    metric: str = "val_loss",
    margin: float = 0.005,
    alpha: float = 0.01,
) -> WelchResult:
    """The Welch test at margin / alpha (the exit status), then both of the challenge's rules, printed.
    baseline and candidate: numbers, or one submission.json or record folder each (see load_sample)."""
    if not baseline or not candidate:
        raise RecordError("compare: give A and B, or --baseline and --candidate")
    old = load_sample(list(baseline), "baseline", metric)
    new = load_sample(list(candidate), "candidate", metric)
    result = welch_test(old, new, margin, alpha)
    for s in (old, new):
        std = "n/a (n=1)" if s.std is None else f"{s.std:.8f}"
        print(f"{s.label}: n={s.n} mean={s.mean:.8f} std={std}")
    print(f"improvement (baseline - candidate): {result.improvement:+.8f} (margin {margin:g})")
    if result.t is not None:
        print(
            f"Welch t={result.t:.4f} df={result.df:.2f} one-sided p={result.p:.4g} "
            f"(H1: improvement > {margin:g})"
        )
    print(f"verdict: {result.verdict}")
    units = "" if metric == "val_loss" else f" (the README's margin is in nats; these are {metric})"
    for label, rule_margin, rule_alpha in (
        (f"README rule (beat A by {README_MARGIN:g} at p < {README_ALPHA:g})", README_MARGIN, README_ALPHA),
        (f"chronological rule (beat A at p < {CHRONOLOGICAL_ALPHA:g})", 0.0, CHRONOLOGICAL_ALPHA),
    ):
        rule = welch_test(old, new, rule_margin, rule_alpha)
        p = "n/a" if rule.p is None else f"{rule.p:.4g}"
        met = "met" if rule.significant else "not met"
        print(f"{label}: one-sided p={p}: {met}{units if rule_margin else ''}")
    return result
