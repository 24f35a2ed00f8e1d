"""The comparison statistics against scipy (the reference): t quantiles, mean intervals, paired differences."""

import math

import pytest
import scipy.stats

from rlkd_onpolicy.eval.stats import mean_interval, paired_difference, t_cdf, t_quantile, verdict


@pytest.mark.parametrize("df", [1, 2, 3, 4, 5, 9, 29, 250])  # 3-5 seeds are the common case; 1 and 250 the ends
def test_t_quantile_and_cdf_match_scipy(df):
    for p in (0.5, 0.9, 0.975, 0.995, 0.025):
        assert t_quantile(p, df) == pytest.approx(scipy.stats.t.ppf(p, df), rel=1e-9, abs=1e-12)
    for t in (-4.0, -1.3, 0.0, 0.7, 2.5):
        assert t_cdf(t, df) == pytest.approx(scipy.stats.t.cdf(t, df), rel=1e-10, abs=1e-14)


def test_mean_interval_is_scipys_t_interval_on_fixed_numbers():
    values = [12.1, 13.4, 11.8, 12.9, 13.0]  # e.g. a method's BLEU over 5 seeds
    got = mean_interval(values)
    low, high = scipy.stats.t.interval(0.95, len(values) - 1, loc=scipy.stats.tmean(values),
                                       scale=scipy.stats.sem(values))  # fmt: skip
    assert got.mean == pytest.approx(12.64)
    assert (got.low, got.high) == (pytest.approx(low, rel=1e-12), pytest.approx(high, rel=1e-12))
    assert got.n == 5 and got.half_width == pytest.approx((high - low) / 2)


def test_paired_difference_uses_the_per_seed_differences():
    method, baseline = [3.1, 2.9, 3.4], [2.8, 2.7, 3.0]  # the seed effect is shared: pairing removes it
    got = paired_difference(method, baseline)
    diffs = [0.3, 0.2, 0.4]
    low, high = scipy.stats.t.interval(0.95, 2, loc=0.3, scale=scipy.stats.sem(diffs))
    assert got.mean == pytest.approx(0.3)
    assert (got.low, got.high) == (pytest.approx(low), pytest.approx(high))
    assert verdict(got) == "better" and verdict(got, higher_is_better=False) == "worse"
    # unpaired, the same numbers overlap: the intervals of the two means both contain 3.0
    assert mean_interval(method).contains(3.0) and mean_interval(baseline).contains(2.85)


def test_verdicts_and_bad_input():
    assert verdict(paired_difference([1.0, 2.0, 3.0], [1.5, 1.5, 2.5])) == "no difference measured"
    one = mean_interval([4.0])
    assert one.mean == 4.0 and math.isnan(one.low) and verdict(one) == "one seed: not tested"
    with pytest.raises(ValueError, match="as many method values"):
        paired_difference([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="NaN"):
        mean_interval([1.0, math.nan])
    with pytest.raises(ValueError, match="at least one"):
        mean_interval([])
