"""Tests for tools/studies/moe_breakeven.py: the plan's runs and order, the refusal of another script, the
break-even estimator (inverse prediction interval) and its readings, and collect on the regime study's
committed logs."""

import json
import math
import shutil
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from scipy import stats

from conftest import REPO

from tools.common import StudyError
from tools.studies import moe_breakeven

DENSE = [2.0895, 2.0870, 2.0920]


def args_for(tmp_path, **changes):
    args = dict(
        data=str(REPO / "data/sample"),
        tokenizer=None,
        out=tmp_path / "study",
        regime=moe_breakeven.REGIME,
        seeds="1337,1338,1339",
        jobs=2,
        python=sys.executable,
        timeout=None,
        dry_run=True,
    )
    return SimpleNamespace(**{**args, **changes})


def test_planned_runs_go_seed_by_seed_with_the_plans_steps(tmp_path):
    runs = moe_breakeven.planned_runs(args_for(tmp_path), {"TRAIN_BATCH_TOKENS": "8192"})
    assert [(r.seed, r.name) for r in runs[:4]] == [
        (1337, "topk4_m125"),
        (1337, "topk4_m144"),
        (1337, "topk4_m160"),
        (1338, "topk4_m125"),
    ]
    steps = {r.name: int(r.env["ITERATIONS"]) for r in runs}
    assert steps == {"topk4_m125": 3080, "topk4_m144": 3548, "topk4_m160": 3942}  # plan.md's table
    assert all(r.env["MOE_MODE"] == "topk" and r.env["TOP_K"] == "1" for r in runs)


def test_the_regime_script_is_checked_against_its_budget(tmp_path):
    assert moe_breakeven.regime_script(args_for(tmp_path)).is_file()
    copy = tmp_path / "regime"
    shutil.copytree(moe_breakeven.REGIME / "designs", copy / "designs", ignore=shutil.ignore_patterns("runs"))
    (copy / "designs/train_gpt.py").write_text("# another script\n")
    with pytest.raises(StudyError, match="not the budget"):
        moe_breakeven.regime_script(args_for(tmp_path, regime=copy))


def synthetic(slope: float, noise: float = 0.002, seed: int = 0):
    rng = np.random.default_rng(seed)
    multiples = (1.0848, 1.25, 1.44, 1.6)
    return [(m, 2.11 + slope * math.log(m) + rng.normal(0, noise)) for m in multiples for _ in range(3)]


def test_break_even_interval_ends_are_where_the_line_meets_dense_within_t_standard_errors():
    points = synthetic(-0.08)
    estimate = moe_breakeven.break_even(points, DENSE)
    low, high = estimate["interval"]
    assert low < estimate["multiple"] < high
    # each end solves (a + b x)^2 = t^2 s^2 (1/n + (x - xbar)^2 / sxx + 1/n_dense): check it independently
    x = np.log([m for m, _ in points])
    y = np.array([v for _, v in points])
    b, a = np.polyfit(x, y, 1)
    rss = ((y - a - b * x) ** 2).sum() + ((np.array(DENSE) - np.mean(DENSE)) ** 2).sum()
    s2 = rss / (len(x) - 2 + len(DENSE) - 1)
    t = stats.t.ppf(0.975, len(x) - 2 + len(DENSE) - 1)
    for end in (low, high):
        xe = math.log(end)
        lhs = (a - np.mean(DENSE) + b * xe) ** 2
        rhs = t**2 * s2 * (1 / len(x) + (xe - x.mean()) ** 2 / ((x - x.mean()) ** 2).sum() + 1 / len(DENSE))
        assert lhs == pytest.approx(rhs, rel=1e-9)
    assert estimate["step_time_ratio"] == pytest.approx(1 / estimate["multiple"])
    assert estimate["step_time_ratio_interval"] == pytest.approx([1 / high, 1 / low])


def test_a_flat_or_rising_line_locates_no_break_even():
    for slope in (0.0, 0.02):
        estimate = moe_breakeven.break_even(synthetic(slope), DENSE)
        assert estimate["interval"] is None
        assert "not located" in moe_breakeven.break_even_reading(estimate)


@pytest.mark.parametrize(
    "interval, reading",
    [
        ((1.5, 1.9), "would not make topk4 beat dense"),
        ((1.1, 1.3), "a kernel at or below 0.769x"),
        ((1.3, 1.6), "straddles"),
    ],
)
def test_break_even_readings_follow_the_plan(interval, reading):
    assert reading in moe_breakeven.break_even_reading({"interval": list(interval)})


def test_collect_reads_the_regime_studys_dense_and_equal_time_arms(tmp_path):
    args = args_for(tmp_path)
    args.out.mkdir()
    assert moe_breakeven.collect(args) == 0
    manifest = json.loads((args.out / "manifest.json").read_text())
    assert manifest["arms"]["dense"]["seeds"] == [1337, 1338, 1339]
    gap = manifest["results"]["gaps"]["topk4_equal_time"]
    assert gap["gap"] == pytest.approx(0.0203, abs=5e-5)  # the regime study's results.md
    assert not manifest["results"]["complete"]
    assert "Incomplete" in (args.out / "results.md").read_text()
    submission = json.loads((args.out / "submission.json").read_text())  # the validator's top level
    assert submission["study"] == "manifest.json" and submission["seeds"] == [1337, 1338, 1339]
    assert submission["val_bpb"] == pytest.approx(2.0895, abs=5e-5)  # the dense control's mean
    assert (args.out / "train_seed1337.txt").is_file()
