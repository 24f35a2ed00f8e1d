"""Statistics for comparing methods over seeds: Student's t intervals of a mean and of paired differences.

A comparison of methods reports, for each method, the mean over seeds and a 95 % confidence interval, and for each
method against its baseline the mean of the per-seed differences (runs paired by seed: same data order, same
initial student) with its interval. A difference whose interval contains 0 is "no difference measured".

Plain Python (no scipy at run time): the t quantile inverts the t CDF, written with the regularised incomplete beta
function (continued fraction, Lentz's method); tests check it against scipy.
"""

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function I_x(a, b) (modified Lentz, 1e-15 relative)."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):  # fmt: skip
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return h


def regularized_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b) for a, b > 0 and 0 ≤ x ≤ 1."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T ≤ t) for Student's t with `df` degrees of freedom."""
    if df <= 0:
        raise ValueError(f"df={df} must be > 0.")
    tail = 0.5 * regularized_beta(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The p-quantile of Student's t with `df` degrees of freedom (bisection on `t_cdf`, to ~1e-12)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p={p} must be in (0, 1).")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    low, high = 0.0, 1.0
    while t_cdf(high, df) < p:
        high *= 2.0
    for _ in range(200):
        mid = 0.5 * (low + high)
        if t_cdf(mid, df) < p:
            low = mid
        else:
            high = mid
        if high - low < 1e-12 * max(1.0, high):
            break
    return 0.5 * (low + high)


@dataclass(frozen=True)
class Interval:
    """A mean over n values and its two-sided confidence interval [low, high] at `confidence`."""

    mean: float
    low: float
    high: float
    n: int
    confidence: float = 0.95

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2.0

    def contains(self, value: float) -> bool:
        return self.low <= value <= self.high


def mean_interval(values: Sequence[float], confidence: float = 0.95) -> Interval:
    """Mean of `values` and its Student's t interval; with one value the interval is unknown (nan bounds)."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("mean_interval needs at least one value.")
    if any(math.isnan(v) for v in values):
        raise ValueError(f"mean_interval got NaN among {values}.")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence={confidence} must be in (0, 1).")
    mean = statistics.fmean(values)
    n = len(values)
    if n == 1:
        return Interval(mean, math.nan, math.nan, 1, confidence)
    half = t_quantile(0.5 + confidence / 2.0, n - 1) * statistics.stdev(values) / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n, confidence)


def paired_difference(method: Sequence[float], baseline: Sequence[float], confidence: float = 0.95) -> Interval:
    """Mean and t interval of `method[i] − baseline[i]` over runs paired by index (seed)."""
    if len(method) != len(baseline):
        raise ValueError(f"paired runs need as many method values ({len(method)}) as baseline values "
                         f"({len(baseline)}), one per seed.")  # fmt: skip
    return mean_interval([m - b for m, b in zip(method, baseline, strict=True)], confidence)


def verdict(difference: Interval, higher_is_better: bool = True) -> str:
    """Words for a paired difference: 'better', 'worse', 'no difference measured', or 'one seed: not tested'."""
    if difference.n < 2:
        return "one seed: not tested"
    if difference.contains(0.0):
        return "no difference measured"
    return "better" if (difference.mean > 0) == higher_is_better else "worse"
