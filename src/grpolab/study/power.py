"""What a study's seeds can detect: the power of the paired t-test that its report uses (each arm against the
baseline, seed by seed), the smallest difference that test detects with n seeds, and how many seeds a given
difference needs. Pure functions of the spread of the per-seed differences; the noncentral t, not a normal
approximation, because a study has a handful of seeds (with 3, z would promise ~1.6x the power it has)."""

from __future__ import annotations

import math

from scipy import optimize, stats

ALPHA = 0.05  # two-sided
POWER = 0.8
MAX_SEEDS = 1000  # seeds_needed's answer stops here: a difference that needs more is not one to chase with seeds


def paired_power(effect: float, n: int, alpha: float = ALPHA) -> float:
    """Power of the two-sided paired t-test at level `alpha` with `n` pairs when the mean difference is `effect`
    standard deviations of the differences (|Δ| / sd): P(|T| > t_{1-α/2, n-1}), T ~ noncentral t(n-1, effect·√n).
    NaN below 2 pairs (no spread to test against)."""
    if n < 2:
        return math.nan
    df, nc = n - 1, abs(effect) * math.sqrt(n)
    critical = stats.t.ppf(1 - alpha / 2, df)
    lower = stats.nct.cdf(-critical, df, nc)  # the wrong-sign tail: scipy returns NaN where it is below ~1e-300
    return float(stats.nct.sf(critical, df, nc) + (0.0 if math.isnan(lower) else lower))


def detectable_effect(n: int, alpha: float = ALPHA, power: float = POWER) -> float:
    """The smallest |Δ| / sd that `n` pairs detect with `power`: the root of paired_power(effect, n) = power.
    NaN below 2 pairs."""
    if n < 2:
        return math.nan
    high = 1.0
    while paired_power(high, n, alpha) < power:  # bracket the root; power grows with the effect
        high *= 2
    return float(optimize.brentq(lambda e: paired_power(e, n, alpha) - power, 0.0, high, xtol=1e-10))


def min_detectable_difference(sd: float, n: int, alpha: float = ALPHA, power: float = POWER) -> float:
    """The smallest mean difference that `n` seeds detect with `power`, in the metric's own unit, given `sd`, the
    sample std of the per-seed differences (0 when every seed's difference is the same: any difference shows)."""
    return sd * detectable_effect(n, alpha, power) if sd > 0 else (0.0 if n >= 2 else math.nan)


def seeds_needed(difference: float, sd: float, alpha: float = ALPHA, power: float = POWER) -> float:
    """How many seeds (pairs) a true mean difference `difference` needs for the paired t-test to detect it with
    `power`, given `sd` of the per-seed differences: the smallest n >= 2 with enough power; inf past MAX_SEEDS
    or for a difference of 0, NaN where sd is unknown."""
    if math.isnan(sd) or math.isnan(difference):
        return math.nan
    if difference == 0:
        return math.inf
    if sd == 0:
        return 2.0
    effect = abs(difference) / sd
    if paired_power(effect, MAX_SEEDS, alpha) < power:
        return math.inf
    low, high = 2, MAX_SEEDS  # power grows with n: bisect for the first n that has enough
    while low < high:
        mid = (low + high) // 2
        low, high = (mid + 1, high) if paired_power(effect, mid, alpha) < power else (low, mid)
    return float(low)
