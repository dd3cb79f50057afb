"""Dependence between coordinates: HSIC and binned MI from the accumulator, distance correlation
on a row subsample (permutation tests), the Gaussian total correlation, the Amari distance.

Pure numpy / scipy.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy import stats

if TYPE_CHECKING:
    from pflatents.tasks.analysis.stats import StatsConfig

__all__ = ["pair_threshold", "hsic", "binned_mi", "distance_correlation", "dcor_permutation_test",
           "select_pairs", "dcor_tests", "total_correlation", "amari_distance"]


def pair_threshold(n: int, m: int, alpha: float) -> float:
    """Bonferroni bound on |r|: z_{1 - alpha/(2m)} / sqrt(N)."""
    return float(stats.norm.isf(alpha / (2 * max(m, 1))) / math.sqrt(n))


def hsic(acc: dict[str, Any], n_pair: int, m2: int) -> tuple[np.ndarray, np.ndarray]:
    """Biased HSIC (RFF) of every pair of pair-dims and its Gamma-approximated null p-value."""
    c = acc["rff"]["C"] / acc["rff"]["n"]
    blocks = c.reshape(n_pair, m2, n_pair, m2).transpose(0, 2, 1, 3)
    hsic = (blocks ** 2).sum((2, 3))
    own = blocks[np.arange(n_pair), np.arange(n_pair)]
    tr1 = np.trace(own, axis1=1, axis2=2)
    tr2 = np.einsum("kab,kba->k", own, own)
    mean, var = np.outer(tr1, tr1), 2 * np.outer(tr2, tr2)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = stats.gamma.sf(acc["rff"]["n"] * hsic, mean ** 2 / var, scale=var / mean)
    np.fill_diagonal(p, 1.0)
    return hsic, np.nan_to_num(p, nan=1.0)


def binned_mi(table: np.ndarray, n_pair: int, bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Binned mutual information (nats) of every pair and its G-test p-value, G = 2 N MI."""
    t = table.reshape(n_pair, bins, n_pair, bins).transpose(0, 2, 1, 3).astype(np.float64)
    n = t[0, 0].sum()
    rows, cols = t.sum(3, keepdims=True), t.sum(2, keepdims=True)
    expected = rows * cols / n
    with np.errstate(invalid="ignore", divide="ignore"):
        terms = np.where(t > 0, t * np.log(t / expected), 0.0)
    g = 2 * terms.sum((2, 3))
    p = stats.chi2.sf(g, (bins - 1) ** 2)
    np.fill_diagonal(p, 1.0)
    return g / (2 * n), p


def total_correlation(r: np.ndarray, n: int, alpha: float) -> dict[str, Any]:
    """Gaussian total correlation -1/2 log det R, its null mean m/(2N) and Bartlett's test."""
    d = len(r)
    m = d * (d - 1) // 2
    if d == 0:
        return {"gaussian_total_correlation": 0.0, "gaussian_total_correlation_null_mean": 0.0,
                "bartlett_stat": 0.0, "bartlett_p": 1.0, "bartlett_rejected": False}
    sign, logdet = np.linalg.slogdet(r)
    logdet = logdet if sign > 0 else -np.inf
    stat = -(n - 1 - (2 * d + 5) / 6) * logdet
    p = float(stats.chi2.sf(stat, m)) if m else 1.0
    return {"gaussian_total_correlation": float(-0.5 * logdet), "gaussian_total_correlation_null_mean":
            m / (2 * n), "bartlett_stat": float(stat), "bartlett_p": p, "bartlett_rejected": p < alpha}


# ---- distance correlation (subsample) --------------------------------------------------------

def _centred_distances(x: np.ndarray) -> np.ndarray:
    """Double-centred distance matrix of a 1-D sample."""
    a = np.abs(x[:, None] - x[None, :])
    return a - a.mean(0)[None, :] - a.mean(1)[:, None] + a.mean()


def distance_correlation(x: np.ndarray, y: np.ndarray) -> float:
    """Distance correlation (V-statistic, as ``dcor.distance_correlation``) of two 1-D samples."""
    a, b = _centred_distances(np.asarray(x, float)), _centred_distances(np.asarray(y, float))
    dxy, dxx, dyy = (a * b).mean(), (a * a).mean(), (b * b).mean()
    return float(math.sqrt(max(dxy, 0.0) / math.sqrt(dxx * dyy))) if dxx > 0 and dyy > 0 else 0.0


def dcor_permutation_test(x: np.ndarray, y: np.ndarray, permutations: int, rng: np.random.Generator
                          ) -> tuple[float, float]:
    """dCor and its permutation p-value (1 + #{perm >= observed}) / (1 + permutations)."""
    a, b = _centred_distances(np.asarray(x, float)), _centred_distances(np.asarray(y, float))
    obs = (a * b).mean()
    hits = 0
    for _ in range(permutations):
        p = rng.permutation(len(y))
        hits += (a * b[p][:, p]).mean() >= obs - 1e-15 * abs(obs)
    return distance_correlation(x, y), (1 + hits) / (1 + permutations)


def select_pairs(result: dict[str, Any], cfg: StatsConfig) -> list[tuple[int, int]]:
    """Up to ``dcor_pairs`` pairs: the most strongly flagged ones first, then seeded random pairs."""
    d, n = result["d"], result["n"]
    m = d * (d - 1) // 2
    if m == 0:
        return []
    thr = pair_threshold(n, m, cfg.alpha)
    score = np.maximum(np.abs(result["corr_sq"]), np.abs(result["corr_abs"])) / thr
    iu = np.triu_indices(d, 1)
    order = np.argsort(-score[iu])
    flagged = [(int(iu[0][k]), int(iu[1][k])) for k in order if score[iu][k] > 1]
    pairs = flagged[: max(1, cfg.dcor_pairs // 2)]
    rng = np.random.default_rng([cfg.seed, 3])
    for k in rng.permutation(m):
        if len(pairs) >= min(cfg.dcor_pairs, m):
            break
        pair = (int(iu[0][k]), int(iu[1][k]))
        if pair not in pairs:
            pairs.append(pair)
    return pairs


def dcor_tests(sample: np.ndarray, pairs: list[tuple[int, int]], cfg: StatsConfig) -> list[dict[str, Any]]:
    """Permutation tests of distance correlation on a row subsample, one per pair."""
    x = np.asarray(sample, dtype=np.float64).reshape(len(sample), -1)
    rng = np.random.default_rng([cfg.seed, 4])
    out = []
    for i, j in pairs:
        r, p = dcor_permutation_test(x[:, i], x[:, j], cfg.dcor_permutations, rng)
        out.append({"pair": [i, j], "dcor": r, "p": p,
                    "rejected": bool(p < cfg.alpha / max(len(pairs), 1))})
    return out


def amari_distance(c: np.ndarray) -> float:
    """Normalised Amari distance in [0, 1] of a square matrix from a scaled permutation (0 = one)."""
    p = np.abs(np.asarray(c, dtype=np.float64))
    k = len(p)
    if k < 2:
        return 0.0
    rows = (p.sum(1) / p.max(1) - 1).sum()
    cols = (p.sum(0) / p.max(0) - 1).sum()
    return float((rows + cols) / (2 * k * (k - 1)))
