"""Seed statistics for ablations: the mean of a metric over seeds with a 95% confidence interval,
and the paired difference of a variant against the baseline trained on the same seeds.

No scipy: the two-sided 95% Student's t critical values are tabulated below.
"""

from __future__ import annotations

import math
import statistics

from ..errors import ConfigError

# t_{0.975, df}: the two-sided 95% critical values of Student's t distribution for df = 1..30,
# as printed (3 decimals) in the NIST/SEMATECH e-Handbook of Statistical Methods, section
# 1.3.6.7.2 "Critical Values of the Student's t Distribution"
# (https://www.itl.nist.gov/div898/handbook/eda/section3/eda3672.htm).
T_975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)
Z_975 = 1.96  # the normal quantile, used for df > 30 (t_{0.975, 31} = 2.040: the interval is at most 4% short)


def t_critical(df: int) -> float:
    """The two-sided 95% critical value of Student's t with ``df`` degrees of freedom."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be at least 1, got {df}")
    return T_975[df - 1] if df <= len(T_975) else Z_975


def _mean_std_ci(values: list[float]) -> tuple[float, float, tuple[float, float] | None]:
    """Mean, sample standard deviation (ddof=1; 0 for one value) and the t-based 95% interval
    of the mean (None for one value)."""
    n = len(values)
    mean = statistics.fmean(values)
    if n == 1:
        return mean, 0.0, None
    std = statistics.stdev(values)
    half = t_critical(n - 1) * std / math.sqrt(n)
    return mean, std, (mean - half, mean + half)


def summarize(values: list[float]) -> dict:
    """``n``, ``mean``, ``std`` (sample, ddof=1; 0 for n=1) and ``ci95`` = (low, high), the 95%
    confidence interval of the mean by Student's t (None for n=1). Non-finite values (a diverged
    run) propagate into the result rather than being dropped."""
    values = [float(v) for v in values]
    if not values:
        return dict(n=0, mean=None, std=None, ci95=None)
    mean, std, ci = _mean_std_ci(values)
    return dict(n=len(values), mean=mean, std=std, ci95=ci)


def paired_difference(variant: list[float], baseline: list[float]) -> dict:
    """The per-seed differences ``variant[i] - baseline[i]`` (paired by seed index) and their
    ``n``, ``mean``, ``std``, ``ci95`` (paired t interval; None for n=1) and ``significant``
    (the interval excludes 0; False for n=1). ``differences`` lists the per-seed values."""
    if len(variant) != len(baseline):
        raise ConfigError(
            f"a paired difference needs one variant value per baseline seed: got {len(variant)} variant "
            f"and {len(baseline)} baseline values"
        )
    diffs = [float(v) - float(b) for v, b in zip(variant, baseline)]
    out = summarize(diffs)
    ci = out["ci95"]
    out["significant"] = ci is not None and (ci[0] > 0 or ci[1] < 0)
    out["differences"] = diffs
    return out


__all__ = ["T_975", "Z_975", "paired_difference", "summarize", "t_critical"]
