"""Intervals that hold at n = 3-5 seeds (issue 15): a paired t-interval for searched − random (the
same seed fixes the data order and the initialisation of both), and a Welch interval for two
independent groups (searched − the best budget-matched manual method). A "win" is an interval
entirely above 0."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from scipy import stats


@dataclass(frozen=True)
class Interval:
    """``diff`` ± the half-width of a two-sided ``conf`` interval, with its degrees of freedom."""

    diff: float
    lo: float
    hi: float
    df: float
    n: tuple[int, ...]

    @property
    def no_spread(self) -> bool:
        """A zero-width interval: every seed gave the same difference (or both groups were constant).
        Accuracy is discrete, so a steady difference can be exactly equal on every seed; the
        t-interval then has no width, which says so (identical runs give 0 and read as a tie). Up to
        float rounding: 0.919 - 0.908 and 0.506 - 0.495 (11 rows of 1,000 each) differ by ~1e-16."""
        return math.isclose(self.lo, self.hi, rel_tol=0, abs_tol=1e-12)

    @property
    def win(self) -> bool:
        return self.lo > 0

    @property
    def loss(self) -> bool:
        return self.hi < 0

    def verdict(self) -> str:
        said = "win" if self.win else "loss" if self.loss else "tie"
        return f"{said} (no spread)" if self.no_spread else said

    def fmt(self, scale: float = 100.0) -> str:
        return f"{scale * self.diff:+.1f} [{scale * self.lo:+.1f}, {scale * self.hi:+.1f}]"


def mean_std(xs: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value; tables print none for it, ``fmt_mean_std``)."""
    return statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0


def paired_t_interval(a: list[float], b: list[float], conf: float = 0.95) -> Interval:
    """Mean of the per-pair differences a_i − b_i with a t-interval on n − 1 degrees of freedom.

    Raises:
        ValueError: unequal lengths or fewer than two pairs.
    """
    if len(a) != len(b):
        raise ValueError(f"paired samples need equal lengths, got {len(a)} and {len(b)}")
    if len(a) < 2:
        raise ValueError("a paired interval needs at least two pairs")
    d = [x - y for x, y in zip(a, b, strict=True)]
    m, s = mean_std(d)
    half = stats.t.ppf(0.5 + conf / 2, len(d) - 1) * s / math.sqrt(len(d))
    return Interval(m, m - half, m + half, len(d) - 1, (len(d),))


def welch_interval(a: list[float], b: list[float], conf: float = 0.95) -> Interval:
    """mean(a) − mean(b) with Welch's interval (unequal variances, Welch–Satterthwaite df).

    Raises:
        ValueError: a group with fewer than two values.
    """
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"Welch's interval needs two values per group, got {len(a)} and {len(b)}")
    (ma, sa), (mb, sb) = mean_std(a), mean_std(b)
    va, vb = sa**2 / len(a), sb**2 / len(b)
    diff = ma - mb
    if va + vb == 0:  # both groups constant: the difference is exact
        return Interval(diff, diff, diff, math.inf, (len(a), len(b)))
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    half = stats.t.ppf(0.5 + conf / 2, df) * math.sqrt(va + vb)
    return Interval(diff, diff - half, diff + half, df, (len(a), len(b)))
