"""Per-dimension normality tests against N(0, 1) from a merged accumulator (no further data pass).

Six tests per coordinate: mean (z-test), variance (normal approximation), Jarque-Bera, KS, Anderson-
Darling and chi-square, the last three read off one histogram of Phi(x) on B equal cells. A
coordinate fails when its smallest p-value times the number of tests is below alpha / D (Bonferroni
over tests and coordinates); the per-test counts use the same level alpha / (6 D), so a coordinate
fails overall exactly when at least one per-test count includes it.

Pure numpy / scipy.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy import special, stats

__all__ = ["TESTS", "normality", "moment_stats", "ad_cdf", "ks_ad", "chi2_normality"]

TESTS = ("p_mean", "p_var", "p_jb", "p_ks", "p_ad", "p_chi2")


def moment_stats(mom: dict[str, Any]) -> dict[str, np.ndarray]:
    """Per-dim mean, variance (ddof 1), skewness and excess kurtosis (biased, as scipy) with p-values."""
    n = mom["n"]
    m2, m3, m4 = mom["M2"] / n, mom["M3"] / n, mom["M4"] / n
    with np.errstate(invalid="ignore", divide="ignore"):
        skew, kurt = m3 / m2 ** 1.5, m4 / m2 ** 2 - 3.0
    var = mom["M2"] / max(n - 1, 1)
    jb = n / 6.0 * (skew ** 2 + kurt ** 2 / 4.0)
    return {"mean": mom["mean"], "var": var, "skew": skew, "kurt": kurt, "jb": jb,
            "p_mean": 2 * special.ndtr(-np.abs(math.sqrt(n) * mom["mean"])),
            "p_var": 2 * special.ndtr(-np.abs((var - 1.0) / math.sqrt(2.0 / n))),
            "p_jb": stats.chi2.sf(jb, 2)}


def ad_cdf(a2: np.ndarray) -> np.ndarray:
    """Asymptotic cdf of the Anderson-Darling statistic (Marsaglia & Marsaglia 2004, ADinf)."""
    z = np.maximum(np.asarray(a2, dtype=np.float64), 1e-12)
    small = np.exp(-1.2337141 / z) / np.sqrt(z) * (2.00012 + (.247105 - (.0649821 - (.0347962 - (
        .0116720 - .00168691 * z) * z) * z) * z) * z)
    large = np.exp(-np.exp(1.0776 - (2.30695 - (.43424 - (.082433 - (.008056 - .0003146 * z) * z)
                                                   * z) * z) * z))
    return np.clip(np.where(z < 2, small, large), 0.0, 1.0)


def _mean_log_cells(b: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean of ln u and of ln(1-u) over each cell [k/B, (k+1)/B) under a uniform spread."""
    e = np.arange(b + 1) / b
    g = np.where(e > 0, e * np.log(np.where(e > 0, e, 1)) - e, 0.0)  # antiderivative of ln u
    lu = np.diff(g) * b
    return lu, lu[::-1].copy()


def ks_ad(hist: np.ndarray, tails: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """KS (exact at cell edges, within 1/B) and Anderson-Darling A^2 per dim from the Phi-histogram."""
    d, b = hist.shape
    n = hist.sum(1, keepdims=True).astype(np.float64)
    cdf = np.cumsum(hist, axis=1) / n
    edges = np.arange(1, b + 1) / b
    ks = np.abs(cdf - edges).max(1)
    lu, l1u = _mean_log_cells(b)
    slu, sl1u = hist * lu, hist * l1u  # cell sums of ln u, ln(1-u) (uniform within the cell) ...
    slu[:, 0], sl1u[:, 0] = tails[:, 0], tails[:, 1]  # ... exact in the two tail cells
    slu[:, -1], sl1u[:, -1] = tails[:, 2], tails[:, 3]
    r = np.cumsum(hist, axis=1) - hist  # samples below each cell
    w1 = np.where(hist > 0, (2 * r + hist), 0.0)
    w2 = np.where(hist > 0, (2 * n - 2 * r - hist), 0.0)
    a2 = -n[:, 0] - (w1 * slu + w2 * sl1u).sum(1) / n[:, 0]
    return ks, a2


def chi2_normality(hist: np.ndarray) -> np.ndarray:
    """Chi-square p-value per dim on the Phi-histogram merged to cells expecting >= 10 samples."""
    d, b = hist.shape
    n = int(hist[0].sum())
    k = b
    while k > 2 and n / k < 10:
        k //= 2
    coarse = hist.reshape(d, k, b // k).sum(2)
    chi = ((coarse - n / k) ** 2 / (n / k)).sum(1)
    return stats.chi2.sf(chi, k - 1)


def normality(acc: dict[str, Any], alpha: float) -> dict[str, Any]:
    """Per-dim normality tests; a dim fails if its smallest p-value (x the number of tests) < alpha/D."""
    n = acc["mom"]["n"]
    out = moment_stats(acc["mom"])
    ks, ad = ks_ad(acc["hist"], acc["tails"])
    p_ks = stats.kstwo.sf(ks, n) if n <= 20000 else stats.kstwobign.sf(math.sqrt(n) * ks)  # exact is slow
    out.update(ks=ks, ad=ad, p_ks=p_ks, p_ad=1.0 - ad_cdf(ad), p_chi2=chi2_normality(acc["hist"]))
    for t in TESTS:
        out[t] = np.nan_to_num(out[t], nan=0.0)  # a constant dim (no variance) is not N(0, 1)
    p_dim = np.minimum(1.0, np.min([out[t] for t in TESTS], axis=0) * len(TESTS))
    out["p_dim"] = p_dim
    out["fail"] = p_dim < alpha / len(p_dim)
    return out


def per_test_level(alpha: float, d: int) -> float:
    """The level of each single test in the per-test counts: alpha / (number of tests x D)."""
    return alpha / (len(TESTS) * max(d, 1))
