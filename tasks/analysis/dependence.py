"""Dependence between coordinates: HSIC and binned MI from the accumulator, distance correlation
on a row subsample (permutation tests), the Gaussian total correlation, the Amari distance.

Pure numpy / scipy.
"""

from __future__ import annotations

import math
import warnings
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


IMHOF_PAIRS = 100  # pairs whose Gamma p-value is refined by the exact weighted chi-square law (the smallest)


def weighted_chi2_sf(x: float, w: np.ndarray) -> float:
    """P(sum_k w_k chi2_1 > x) by Imhof's inversion formula (numerical integration)."""
    from scipy import integrate

    w = np.asarray(w, dtype=np.float64)
    w = w[w > 1e-12 * w.max()]

    def f(u: float) -> float:
        theta = 0.5 * np.arctan(w * u).sum() - 0.5 * x * u
        return math.sin(theta) / (u * np.prod((1 + (w * u) ** 2) ** 0.25))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", integrate.IntegrationWarning)  # slow oscillating tail: still ~1e-9
        val = integrate.quad(f, 0, np.inf, limit=500, epsabs=1e-11)[0]
    return float(min(1.0, max(0.0, 0.5 + val / math.pi)))


def hsic(acc: dict[str, Any], n_pair: int, m2: int) -> tuple[np.ndarray, np.ndarray]:
    """Biased HSIC (RFF) of every pair of pair-dims and its null p-value.

    Under independence N HSIC tends to sum_ab lambda_a mu_b chi2_1, the lambda and mu the eigenvalues of
    the two coordinates' feature covariances. A Gamma law matched to its mean and variance gives every
    pair's p-value; its tail is too thin (liberal by about 2x at the Bonferroni levels), so the
    ``IMHOF_PAIRS`` smallest p-values between 1e-9 and 0.05 are recomputed from the exact weighted
    chi-square law (``weighted_chi2_sf``)."""
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
    p = np.nan_to_num(p, nan=1.0)
    iu = np.triu_indices(n_pair, 1)
    pu = p[iu]
    todo = [k for k in np.argsort(pu)[:IMHOF_PAIRS] if 1e-9 < pu[k] < 0.05]
    if todo:
        eig = np.linalg.eigvalsh(own)
        for k in todo:
            i, j = iu[0][k], iu[1][k]
            p[i, j] = p[j, i] = weighted_chi2_sf(acc["rff"]["n"] * hsic[i, j], np.outer(eig[i], eig[j]).ravel())
    return hsic, p


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


# ---- total dependence left (nats) ----------------------------------------------------------------

TD_ROWS = 2000     # rows of the seeded subsample for the total-dependence estimate
TD_MAX_DIMS = 64   # at most this many coordinates (a seeded subset beyond, as the pair tests)
TD_HALVES = 10     # half-samples for the delete-d jackknife interval
TD_NULLS = 4       # Gaussian surrogates with the same correlation: the kNN estimator's level there


def gaussianise(y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Each column to N(0, 1) through its ranks (ties broken at random): Phi^-1(rank / (n + 1)).
    Total correlation is unchanged by such monotone maps of the coordinates."""
    n = len(y)
    out = np.empty_like(y, dtype=np.float64)
    for j in range(y.shape[1]):
        order = rng.permutation(n)
        ranks = np.empty(n)
        ranks[order] = stats.rankdata(y[order, j], method="ordinal")
        out[:, j] = stats.norm.ppf(ranks / (n + 1))
    return out


def ksg_total_correlation(u: np.ndarray, k: int = 8) -> float:
    """Kraskov-Stoegbauer-Grassberger estimate (algorithm 1, max-norm) of the total correlation of the
    columns of u: psi(k) + (D - 1) psi(n) - mean_i sum_j psi(n_j(i) + 1)."""
    from scipy.spatial import cKDTree
    from scipy.special import digamma

    n, d = u.shape
    eps = cKDTree(u).query(u, k + 1, p=np.inf)[0][:, -1]
    total = 0.0
    for j in range(d):
        s = np.sort(u[:, j])
        cnt = np.searchsorted(s, u[:, j] + eps, "left") - np.searchsorted(s, u[:, j] - eps, "right") - 1
        total += digamma(np.maximum(cnt, 0) + 1).mean()
    return float(digamma(k) + (d - 1) * digamma(n) - total)


def _td_parts(y: np.ndarray, rng: np.random.Generator) -> tuple[float, float]:
    """(Gaussian part, non-Gaussian part) of the total correlation of rows y."""
    n, d = y.shape
    g = gaussianise(y, rng)
    r = np.corrcoef(g.T)
    sign, logdet = np.linalg.slogdet(r)
    m = d * (d - 1) // 2
    gauss = (-0.5 * logdet if sign > 0 else np.inf) - m / (2 * n)  # bias-corrected: null mean m / (2n)
    lam, v = np.linalg.eigh(r)
    root = (v * np.sqrt(np.maximum(lam, 0.0))) @ v.T
    surrogate = np.mean([ksg_total_correlation(gaussianise(rng.standard_normal((n, d)) @ root, rng))
                         for _ in range(TD_NULLS)])
    return float(gauss), ksg_total_correlation(g) - float(surrogate)


def total_dependence(y: np.ndarray, seed: int = 0, alpha: float = 0.05, rows: int = TD_ROWS,
                     halves: int = TD_HALVES, index: np.ndarray | None = None) -> dict[str, Any]:
    """Total dependence left between the coordinates of rows y (total correlation, nats), with a
    (1 - alpha) interval, on a seeded subsample of ``rows`` rows (``index`` fixes the rows instead).

    Each coordinate is Gaussianised through its ranks (total correlation is invariant to that), so the
    total splits exactly into a Gaussian part -1/2 log det R of the Gaussianised coordinates (less its
    null mean m/(2n)) and a non-Gaussian part, the negentropy of their joint law: the KSG kNN estimate
    of the Gaussianised rows' total correlation less the same estimate on Gaussian rows with the same
    correlation R, Gaussianised the same way (whose truth is the Gaussian part), so that the
    estimator's bias at this n and D cancels. Interval: delete-d jackknife over ``halves`` seeded half-samples (the spread of the
    half-sample estimates is the estimate's standard error).
    """
    y = np.asarray(y, dtype=np.float64).reshape(len(y), -1)
    rng = np.random.default_rng([seed, 21])
    if index is None:
        index = np.sort(rng.choice(len(y), rows, replace=False)) if len(y) > rows else np.arange(len(y))
    y = y[index]
    live = np.flatnonzero(y.std(0) > 0)
    dims = live if len(live) <= TD_MAX_DIMS else np.sort(rng.choice(live, TD_MAX_DIMS, replace=False))
    y = y[:, dims]
    n, d = y.shape
    if d < 2 or n < max(50, 8 * d):
        return {"total": None, "n": int(n), "dims": int(d),
                "reason": f"{n} rows for {d} coordinates: the estimate needs at least max(50, 8 D) rows and 2 coordinates"}
    gauss, nongauss = _td_parts(y, rng)
    half_rng = np.random.default_rng([seed, 22])
    picks = [np.sort(half_rng.choice(n, n // 2, replace=False)) for _ in range(halves)]
    totals = np.array([sum(_td_parts(y[p], rng)) for p in picks])
    total = gauss + nongauss
    se = float(np.sqrt(np.mean((totals - totals.mean()) ** 2)))
    z = float(stats.norm.isf(alpha / 2))
    return {"total": total, "total_ci": [max(0.0, total - z * se), total + z * se], "standard_error": se,
            "gaussian": gauss, "non_gaussian": nongauss,
            "n": int(n), "dims": int(d), "ci_level": 1 - alpha, "half_sample_totals": totals.tolist(),
            "method": "rank-Gaussianised coordinates: -1/2 log det R + (KSG, k = 8, less KSG of Gaussian rows with "
                      "the same R); delete-d jackknife over half-samples"}


def difference_ci(a: dict[str, Any], b: dict[str, Any], alpha: float) -> dict[str, Any] | None:
    """a's total dependence minus b's, with a (1 - alpha) interval from the paired half-samples
    (both estimated on the same rows and the same halves)."""
    if a.get("total") is None or b.get("total") is None:
        return None
    ha, hb = np.asarray(a["half_sample_totals"]), np.asarray(b["half_sample_totals"])
    diff = ha - hb
    se = float(np.sqrt(np.mean((diff - diff.mean()) ** 2)))
    d = a["total"] - b["total"]
    z = float(stats.norm.isf(alpha / 2))
    return {"value": d, "ci": [d - z * se, d + z * se], "standard_error": se}
