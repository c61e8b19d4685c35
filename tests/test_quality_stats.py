"""benchmarks/quality_stats.py: the intervals issue 15's verdicts rest on, against textbook values."""

from __future__ import annotations

import math

import pytest

from benchmarks.quality_stats import paired_t_interval, welch_interval


def test_paired_interval_uses_the_differences_and_n_minus_1_df():
    a = [0.82, 0.80, 0.84, 0.81, 0.83]
    b = [0.80, 0.79, 0.80, 0.80, 0.80]  # differences 2, 1, 4, 1, 3 points: mean 2.2, sd 1.3038
    iv = paired_t_interval(a, b)
    half = 2.7764451 * 0.0130384 / math.sqrt(5)  # t(0.975, 4)
    assert iv.diff == pytest.approx(0.022) and iv.df == 4
    assert (iv.lo, iv.hi) == (pytest.approx(0.022 - half, abs=1e-6), pytest.approx(0.022 + half, abs=1e-6))
    assert iv.win and iv.verdict() == "win" and iv.fmt() == "+2.2 [+0.6, +3.8]"


def test_pairing_removes_the_seed_effect_an_unpaired_interval_keeps():
    # seed effects of ±3 points shared by both methods, a steady +1 point difference
    b = [0.78, 0.84, 0.81, 0.75, 0.82]
    a = [x + 0.01 + e for x, e in zip(b, [0.002, -0.002, 0.001, -0.001, 0.0], strict=True)]
    assert paired_t_interval(a, b).win
    assert welch_interval(a, b).verdict() == "tie"


def test_welch_matches_the_welch_satterthwaite_formula():
    a, b = [0.80, 0.82, 0.84], [0.70, 0.78, 0.74, 0.76, 0.72]
    iv = welch_interval(a, b)
    va, vb = 0.0004 / 3, 0.001 / 5  # sample variances 4e-4 and 1e-3
    df = (va + vb) ** 2 / (va**2 / 2 + vb**2 / 4)
    assert iv.df == pytest.approx(df) and iv.diff == pytest.approx(0.08)
    from scipy import stats

    half = stats.t.ppf(0.975, df) * math.sqrt(va + vb)
    assert iv.hi - iv.diff == pytest.approx(half)
    assert iv.n == (3, 5)


def test_an_interval_across_zero_is_a_tie_and_one_below_is_a_loss():
    assert paired_t_interval([0.80, 0.81, 0.79], [0.80, 0.80, 0.80]).verdict() == "tie"
    assert welch_interval([0.70, 0.71, 0.70], [0.80, 0.81, 0.80]).verdict() == "loss"
    assert welch_interval([0.8, 0.8], [0.7, 0.7]).lo == pytest.approx(0.1)  # constant groups: exact


def test_bad_samples_are_named():
    with pytest.raises(ValueError, match="equal lengths"):
        paired_t_interval([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="two values per group"):
        welch_interval([1.0], [1.0, 2.0])


def test_a_zero_width_interval_says_it_has_no_spread():
    # accuracy is discrete: a steady difference can be exactly equal on every seed (150/200 vs
    # 146/200 ...), a consistent win whose t-interval has no width; identical runs give 0, a tie
    steady = paired_t_interval([150 / 200, 152 / 200, 148 / 200], [146 / 200, 148 / 200, 144 / 200])
    assert steady.no_spread and steady.win and steady.verdict() == "win (no spread)"
    same = paired_t_interval([0.81] * 5, [0.81] * 5)
    assert same.no_spread and same.verdict() == "tie (no spread)"
    assert welch_interval([0.7, 0.7], [0.8, 0.8]).verdict() == "loss (no spread)"
    assert not paired_t_interval([0.81, 0.82], [0.80, 0.80]).no_spread
    # 11 rows of 1,000 on every seed, whose float differences are not all the same number
    rows = paired_t_interval([0.919, 0.506, 0.69], [0.908, 0.495, 0.679])
    assert 0 < rows.hi - rows.lo < 1e-12 and rows.verdict() == "win (no spread)"
    assert not paired_t_interval([0.81, 0.8105], [0.8, 0.8]).no_spread  # one row of 2,000 apart is spread
