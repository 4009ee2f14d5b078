"""Statistics over seeds: mean, sample std, 95% confidence interval, paired differences, and
correlations.

Every function takes plain sequences and returns plain floats; undefined values are NaN, never
an error: the standard deviation and the interval need n ≥ 2, and a paired test also needs
differences that vary (identical differences have no test statistic).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from types import ModuleType

import numpy as np


def _scipy_stats() -> ModuleType:
    """scipy.stats, imported on first use (half a second: the feature-extraction jobs, which
    import this module with kdbench.analysis, never need it)."""
    import scipy.stats

    return scipy.stats


def describe(values: Sequence[float]) -> dict[str, float]:
    """n, mean, sample standard deviation and the half-width of the 95% Student-t interval."""
    x = np.asarray(values, dtype=float)
    n = len(x)
    if n == 0:
        return {"n": 0, "mean": math.nan, "std": math.nan, "ci95": math.nan}
    if n == 1:
        return {"n": 1, "mean": float(x[0]), "std": math.nan, "ci95": math.nan}
    std = float(x.std(ddof=1))
    half = float(_scipy_stats().t.ppf(0.975, n - 1) * std / math.sqrt(n))
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
            p = float(_scipy_stats().ttest_rel(x, y).pvalue)
    return {"n": d["n"], "diff": d["mean"], "ci95": d["ci95"], "p": p}


def correlation(x: Sequence[float], y: Sequence[float]) -> dict[str, float]:
    """Pearson and Spearman correlation with p-values over the finite pairs, and their n;
    NaN where fewer than 3 pairs remain or either side is constant."""
    a = np.asarray(x, dtype=float)
    b = np.asarray(y, dtype=float)
    ok = np.isfinite(a) & np.isfinite(b)
    a, b = a[ok], b[ok]
    out = {"n": len(a), "pearson_r": math.nan, "pearson_p": math.nan}
    out |= {"spearman_r": math.nan, "spearman_p": math.nan}
    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return out
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stats = _scipy_stats()
        pearson = stats.pearsonr(a, b)
        spearman = stats.spearmanr(a, b)
    out |= {"pearson_r": float(pearson.statistic), "pearson_p": float(pearson.pvalue)}
    out |= {"spearman_r": float(spearman.statistic), "spearman_p": float(spearman.pvalue)}
    return out
