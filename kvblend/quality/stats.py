"""Bootstrap 95% intervals over samples (percentile bootstrap, paired when two arms share samples)."""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

RESAMPLES = 2000


def _indices(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(RESAMPLES, n))


def mean_ci(values: Sequence[float], seed: int = 0) -> tuple[float, float, float]:
    """(mean, lo, hi) with a 95% percentile bootstrap interval; (nan, nan, nan) for no values."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return math.nan, math.nan, math.nan
    means = x[_indices(x.size, seed)].mean(axis=1)
    return float(x.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def paired_ci(a: Sequence[float], b: Sequence[float], stat: Callable[[np.ndarray, np.ndarray], np.ndarray],
              seed: int = 0) -> tuple[float, float, float]:
    """stat(mean-able arrays a, b) on the samples and its 95% interval, resampling the same sample indices
    for both arms. stat gets [R, n] arrays and returns [R]."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.size == 0 or x.size != y.size:
        raise ValueError(f"paired samples must be non-empty and of one length ({x.size} vs {y.size})")
    point = float(stat(x[None], y[None])[0])
    idx = _indices(x.size, seed)
    boot = stat(x[idx], y[idx])
    boot = boot[np.isfinite(boot)]
    if boot.size == 0:
        return point, math.nan, math.nan
    return point, float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))


def ratio_of_means(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return x.mean(axis=-1) / y.mean(axis=-1)


def diff_of_means(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return x.mean(axis=-1) - y.mean(axis=-1)
