"""Statistics over seeds: mean, sample std, 95% confidence interval, paired differences.

Every function takes plain sequences and returns plain floats; undefined values are NaN, never
an error: the standard deviation and the interval need n ≥ 2, and a paired test also needs
differences that vary (identical differences have no test statistic).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import scipy.stats


def describe(values: Sequence[float]) -> dict[str, float]:
    """n, mean, sample standard deviation and the half-width of the 95% Student-t interval."""
    x = np.asarray(values, dtype=float)
    n = len(x)
    if n == 0:
        return {"n": 0, "mean": math.nan, "std": math.nan, "ci95": math.nan}
    if n == 1:
        return {"n": 1, "mean": float(x[0]), "std": math.nan, "ci95": math.nan}
    std = float(x.std(ddof=1))
    half = float(scipy.stats.t.ppf(0.975, n - 1) * std / math.sqrt(n))
    return {"n": n, "mean": float(x.mean()), "std": std, "ci95": half}


def paired_difference(a: Sequence[float], b: Sequence[float]) -> dict[str, float]:
    """Mean of a − b over pairs (the same seed), its 95% interval and the paired t-test p-value."""
    x = np.asarray(a, dtype=float)
    y = np.asarray(b, dtype=float)
    if len(x) != len(y):
        raise ValueError(f"paired samples differ in length: {len(x)} and {len(y)}")
    d = describe(x - y)
    p = math.nan
    if d["n"] >= 2 and d["std"] > 0:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            p = float(scipy.stats.ttest_rel(x, y).pvalue)
    return {"n": d["n"], "diff": d["mean"], "ci95": d["ci95"], "p": p}
