"""One-pass, mergeable statistics of latents against N(0, I) (formulas in docs/STATISTICS.md).

Every chunk of rows becomes a small accumulator of float64 sums (central moments, co-moments) and
integer counts (Phi-histogram, contingency tables) with an associative merge (Chan / Pebay), so a
dask tree-reduction gives the same answer however the array is chunked (to rounding; counts exactly).
Distance correlation is the one subsample-only test: permutation tests on a seeded row subsample.

Pure numpy / scipy / dask: no Prefect, no zarr.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import special, stats
from threadpoolctl import threadpool_limits

__all__ = ["StatsConfig", "Plan", "make_plan", "chunk_accum", "merge", "reduce_dask",
           "finalize", "compute_stats", "distance_correlation", "dcor_permutation_test",
           "dcor_tests", "select_pairs", "summarise", "amari_distance", "ad_cdf", "verdict"]

SUB_ROWS = 8192  # rows per in-chunk piece: bounds the feature matrices' memory


@dataclass(frozen=True)
class StatsConfig:
    """Settings of the statistics; all tests are at level ``alpha`` after Bonferroni."""

    alpha: float = 0.05
    phi_bins: int = 2 ** 14      # cells of Phi(x) for KS / AD / chi-square
    mi_bins: int = 4             # equiprobable N(0,1) bins per dim for the binned MI G-test
    hsic_freqs: int = 2          # random Fourier frequencies per dim (2 features each)
    pair_dims: int = 64          # HSIC / MI on at most this many dims (a seeded subset beyond)
    dcor_pairs: int = 8          # pairs given a distance-correlation permutation test
    dcor_n: int = 500            # rows of the seeded subsample for dCor
    dcor_permutations: int = 199
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.alpha < 1:
            raise ValueError(f"alpha must lie in (0, 1); got {self.alpha}")
        if self.phi_bins % self.mi_bins:
            raise ValueError(f"mi_bins ({self.mi_bins}) must divide phi_bins ({self.phi_bins})")
        for name in ("hsic_freqs", "pair_dims", "dcor_n", "dcor_permutations"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Plan:
    """What every chunk computes, fixed before the pass: dims for pair tests, RFF frequencies."""

    d: int
    pair_dims: np.ndarray
    freqs: np.ndarray
    phi_bins: int
    mi_bins: int


def make_plan(d: int, cfg: StatsConfig) -> Plan:
    """Seeded choice of the pair-test dims (all when d <= pair_dims) and RFF frequencies w ~ N(0,1)."""
    rng = np.random.default_rng([cfg.seed, 1])
    dims = np.arange(d) if d <= cfg.pair_dims else np.sort(rng.choice(d, cfg.pair_dims, replace=False))
    freqs = np.random.default_rng([cfg.seed, 2]).normal(size=cfg.hsic_freqs)
    return Plan(d, dims, freqs, cfg.phi_bins, cfg.mi_bins)


# ---- accumulators ----------------------------------------------------------------------------

def _moments(x: np.ndarray) -> dict[str, Any]:
    """n, mean and central power sums M2..M4 per column."""
    mean = x.mean(0)
    c = x - mean
    c2 = c * c
    return {"n": len(x), "mean": mean, "M2": c2.sum(0), "M3": (c2 * c).sum(0), "M4": (c2 * c2).sum(0)}


def _comoment(f: np.ndarray) -> dict[str, Any]:
    """n, mean and centred cross-product matrix of the columns of ``f``."""
    mean = f.mean(0)
    c = f - mean
    return {"n": len(f), "mean": mean, "C": c.T @ c}


def _rff(x: np.ndarray, freqs: np.ndarray) -> np.ndarray:
    """Random Fourier features sqrt(1/m)[cos(w x), sin(w x)] per column (k(x,y) ~ exp(-(x-y)^2/2))."""
    wx = x[:, :, None] * freqs[None, None, :]
    f = np.concatenate([np.cos(wx), np.sin(wx)], axis=2) / math.sqrt(len(freqs))
    return f.reshape(len(x), -1)


def _phi_counts(x: np.ndarray, plan: Plan) -> dict[str, np.ndarray]:
    """Histogram of Phi(x) per dim on B equal cells, exact log-sums of the two tail cells,
    and the contingency counts of the pair dims on mi_bins equiprobable bins."""
    n, d = x.shape
    b = plan.phi_bins
    cell = np.minimum((special.ndtr(x) * b).astype(np.int64), b - 1)
    flat = (cell + b * np.arange(d)[None, :]).ravel()
    hist = np.bincount(flat, minlength=d * b).reshape(d, b)
    tails = np.zeros((d, 4))
    for k, c in ((0, 0), (2, b - 1)):
        rows, cols = np.nonzero(cell == c)
        v = x[rows, cols]
        np.add.at(tails[:, k], cols, special.log_ndtr(v))
        np.add.at(tails[:, k + 1], cols, special.log_ndtr(-v))
    mi_bin = cell[:, plan.pair_dims] * plan.mi_bins // b
    onehot = np.zeros((n, len(plan.pair_dims) * plan.mi_bins), dtype=np.float32)
    cols = mi_bin + plan.mi_bins * np.arange(len(plan.pair_dims))[None, :]
    onehot[np.arange(n)[:, None], cols] = 1.0
    table = (onehot.T @ onehot).astype(np.int64)  # exact: float32 holds integers below 2^24
    return {"hist": hist, "tails": tails, "table": table}


def _accum_rows(x: np.ndarray, plan: Plan) -> dict[str, Any]:
    """The accumulator of one piece of rows (float64)."""
    xp = x[:, plan.pair_dims]
    return {"mom": _moments(x), "z": _comoment(x), "sq": _comoment(x * x), "abs": _comoment(np.abs(x)),
            "rff": _comoment(_rff(xp, plan.freqs)), **_phi_counts(x, plan)}


def chunk_accum(block: np.ndarray, plan: Plan) -> dict[str, Any]:
    """Accumulator of a chunk (N_chunk, D), computed in pieces of SUB_ROWS rows."""
    x = np.asarray(block, dtype=np.float64).reshape(len(block), -1)
    if not np.isfinite(x).all():
        raise ValueError("latents hold NaN or Inf values")
    parts = [_accum_rows(x[i:i + SUB_ROWS], plan) for i in range(0, max(len(x), 1), SUB_ROWS)]
    return functools.reduce(merge, parts)


def _merge_moments(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Pebay's pairwise merge of central power sums up to order 4."""
    na, nb = a["n"], b["n"]
    if na == 0 or nb == 0:
        return a if nb == 0 else b
    n = na + nb
    d = b["mean"] - a["mean"]
    m2 = a["M2"] + b["M2"] + d ** 2 * na * nb / n
    m3 = (a["M3"] + b["M3"] + d ** 3 * na * nb * (na - nb) / n ** 2
          + 3 * d * (na * b["M2"] - nb * a["M2"]) / n)
    m4 = (a["M4"] + b["M4"] + d ** 4 * na * nb * (na * na - na * nb + nb * nb) / n ** 3
          + 6 * d ** 2 * (na * na * b["M2"] + nb * nb * a["M2"]) / n ** 2
          + 4 * d * (na * b["M3"] - nb * a["M3"]) / n)
    return {"n": n, "mean": a["mean"] + d * nb / n, "M2": m2, "M3": m3, "M4": m4}


def _merge_comoment(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Chan's pairwise merge of co-moment matrices."""
    na, nb = a["n"], b["n"]
    if na == 0 or nb == 0:
        return a if nb == 0 else b
    n = na + nb
    d = b["mean"] - a["mean"]
    return {"n": n, "mean": a["mean"] + d * nb / n, "C": a["C"] + b["C"] + np.outer(d, d) * na * nb / n}


def merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Associative merge of two accumulators."""
    out = {"mom": _merge_moments(a["mom"], b["mom"])}
    for key in ("z", "sq", "abs", "rff"):
        out[key] = _merge_comoment(a[key], b[key])
    for key in ("hist", "tails", "table"):
        out[key] = a[key] + b[key]
    return out


def reduce_dask(x: Any, plan: Plan, scheduler: str | None = None) -> dict[str, Any]:
    """Tree-reduce the accumulators of a dask array's row chunks (whole samples per chunk)."""
    import dask

    x = x.reshape(x.shape[0], -1) if x.ndim != 2 else x
    x = x.rechunk({1: -1})
    plan_d = dask.delayed(plan, pure=True)
    parts = [dask.delayed(chunk_accum)(b, plan_d) for b in x.to_delayed().ravel()]
    while len(parts) > 1:
        parts = [dask.delayed(merge)(*parts[i:i + 2]) if i + 1 < len(parts) else parts[i]
                 for i in range(0, len(parts), 2)]
    with threadpool_limits(limits=1, user_api="blas"):  # dask runs chunks in parallel; BLAS
        return dask.compute(parts[0], scheduler=scheduler)[0]  # threads on top only contend


# ---- finalising ------------------------------------------------------------------------------

def _corr(c: np.ndarray) -> np.ndarray:
    """Correlation matrix from a co-moment matrix."""
    s = np.sqrt(np.diag(c))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = c / np.outer(s, s)
    return np.nan_to_num(r)


def _moment_stats(mom: dict[str, Any]) -> dict[str, np.ndarray]:
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


def _ks_ad(hist: np.ndarray, tails: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
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
    with np.errstate(invalid="ignore", divide="ignore"):
        w1 = np.where(hist > 0, (2 * r + hist), 0.0)
        w2 = np.where(hist > 0, (2 * n - 2 * r - hist), 0.0)
    a2 = -n[:, 0] - (w1 * slu + w2 * sl1u).sum(1) / n[:, 0]
    return ks, a2


def _chi2_normality(hist: np.ndarray) -> np.ndarray:
    """Chi-square p-value per dim on the Phi-histogram merged to cells expecting >= 10 samples."""
    d, b = hist.shape
    n = int(hist[0].sum())
    k = b
    while k > 2 and n / k < 10:
        k //= 2
    coarse = hist.reshape(d, k, b // k).sum(2)
    chi = ((coarse - n / k) ** 2 / (n / k)).sum(1)
    return stats.chi2.sf(chi, k - 1)


def _normality(acc: dict[str, Any], alpha: float) -> dict[str, Any]:
    """Per-dim normality tests; a dim fails if its smallest p-value (x the number of tests) < alpha/D."""
    n = acc["mom"]["n"]
    out = _moment_stats(acc["mom"])
    ks, ad = _ks_ad(acc["hist"], acc["tails"])
    p_ks = stats.kstwo.sf(ks, n) if n <= 20000 else stats.kstwobign.sf(math.sqrt(n) * ks)  # exact is slow
    out.update(ks=ks, ad=ad, p_ks=p_ks, p_ad=1.0 - ad_cdf(ad),
               p_chi2=_chi2_normality(acc["hist"]))
    tests = ("p_mean", "p_var", "p_jb", "p_ks", "p_ad")
    for t in (*tests, "p_chi2"):
        out[t] = np.nan_to_num(out[t], nan=0.0)  # a constant dim (no variance) is not N(0, 1)
    p_dim = np.minimum(1.0, np.min([out[t] for t in tests], axis=0) * len(tests))
    out["p_dim"] = p_dim
    out["fail"] = p_dim < alpha / len(p_dim)
    return out


def _pair_threshold(n: int, m: int, alpha: float) -> float:
    """Bonferroni bound on |r|: z_{1 - alpha/(2m)} / sqrt(N)."""
    return float(stats.norm.isf(alpha / (2 * max(m, 1))) / math.sqrt(n))


def _hsic(acc: dict[str, Any], n_pair: int, m2: int) -> tuple[np.ndarray, np.ndarray]:
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


def _binned_mi(table: np.ndarray, n_pair: int, bins: int) -> tuple[np.ndarray, np.ndarray]:
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


def finalize(acc: dict[str, Any], plan: Plan, cfg: StatsConfig) -> dict[str, Any]:
    """All statistics (arrays) from a merged accumulator."""
    n, d = acc["mom"]["n"], plan.d
    out: dict[str, Any] = {"n": n, "d": d, "pair_dims": plan.pair_dims, "normality": _normality(acc, cfg.alpha)}
    for key in ("z", "sq", "abs"):
        out[f"corr_{key}"] = _corr(acc[key]["C"])
    out["hsic"], out["hsic_p"] = _hsic(acc, len(plan.pair_dims), 2 * len(plan.freqs))
    out["mi"], out["mi_p"] = _binned_mi(acc["table"], len(plan.pair_dims), plan.mi_bins)
    return out


def compute_stats(x: Any, cfg: StatsConfig = StatsConfig(), scheduler: str | None = None
                  ) -> dict[str, Any]:
    """One pass over a (dask or numpy) array (N, ...) -> every one-pass statistic."""
    import dask.array as da

    if isinstance(x, np.ndarray):
        x = da.from_array(x, chunks=(65536, *x.shape[1:]))
    plan = make_plan(int(np.prod(x.shape[1:])), cfg)
    return finalize(reduce_dask(x, plan, scheduler), plan, cfg)


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
    thr = _pair_threshold(n, m, cfg.alpha)
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


# ---- summary ---------------------------------------------------------------------------------

def _offdiag_max(r: np.ndarray) -> float:
    """Largest |off-diagonal| entry (0 for one dim)."""
    if len(r) < 2:
        return 0.0
    return float(np.abs(r[~np.eye(len(r), dtype=bool)]).max())


def _n_over(r: np.ndarray, thr: float) -> int:
    """Number of pairs i < j with |r_ij| > thr."""
    return int((np.abs(r[np.triu_indices(len(r), 1)]) > thr).sum())


def _n_rejected(p: np.ndarray, alpha: float) -> tuple[int, float]:
    """Pairs i < j with p < alpha / m, and the smallest p."""
    iu = np.triu_indices(len(p), 1)
    m = len(iu[0])
    if m == 0:
        return 0, 1.0
    return int((p[iu] < alpha / m).sum()), float(p[iu].min())


def _total_correlation(r: np.ndarray, n: int, alpha: float) -> dict[str, Any]:
    """Gaussian total correlation -1/2 log det R, its null mean m/(2N) and Bartlett's test."""
    d = len(r)
    m = d * (d - 1) // 2
    sign, logdet = np.linalg.slogdet(r)
    logdet = logdet if sign > 0 else -np.inf
    stat = -(n - 1 - (2 * d + 5) / 6) * logdet
    p = float(stats.chi2.sf(stat, m)) if m else 1.0
    return {"gaussian_total_correlation": float(-0.5 * logdet), "gaussian_total_correlation_null_mean":
            m / (2 * n), "bartlett_stat": float(stat), "bartlett_p": p, "bartlett_rejected": p < alpha}


def summarise(res: dict[str, Any], dcor: list[dict[str, Any]], cfg: StatsConfig) -> dict[str, Any]:
    """Plain-JSON summary: normality and independence figures, thresholds and failing dims/pairs."""
    n, d, a = res["n"], res["d"], cfg.alpha
    nm = res["normality"]
    m = d * (d - 1) // 2
    thr = _pair_threshold(n, m, a)
    fail = np.flatnonzero(nm["fail"])
    normality = {
        "max_abs_mean": float(np.abs(nm["mean"]).max()), "max_abs_var_minus_1": float(np.abs(nm["var"] - 1).max()),
        "mean_abs_skew": float(np.nanmean(np.abs(nm["skew"]))),
        "mean_abs_excess_kurtosis": float(np.nanmean(np.abs(nm["kurt"]))),
        "n_constant_dims": int((nm["var"] <= 0).sum()),
        "kurtosis_threshold": float(stats.norm.isf(a / 2) * math.sqrt(24 / n)),
        "max_ks": float(nm["ks"].max()), "ks_threshold_5pct": 1.358 / math.sqrt(n),
        "max_ad": float(nm["ad"].max()), "ad_threshold_5pct": 2.492,
        "n_dims_failing": int(len(fail)), "failing_dims": fail[:50].tolist(),
        "n_dims_failing_by_test": {t: int((nm[f"p_{t}"] < a / d).sum()) for t in
                                   ("mean", "var", "jb", "ks", "ad", "chi2")}}
    hsic_n, hsic_p = _n_rejected(res["hsic_p"], a)
    mi_n, mi_p = _n_rejected(res["mi_p"], a)
    independence = {
        "max_abs_offdiag_corr": _offdiag_max(res["corr_z"]), "corr_threshold": thr,
        "n_pairs_over_threshold": _n_over(res["corr_z"], thr),
        **_total_correlation(res["corr_z"], n, a),
        "max_abs_offdiag_corr_of_squares": _offdiag_max(res["corr_sq"]),
        "n_pairs_over_threshold_squares": _n_over(res["corr_sq"], thr),
        "max_abs_offdiag_corr_of_abs": _offdiag_max(res["corr_abs"]),
        "n_pairs_over_threshold_abs": _n_over(res["corr_abs"], thr),
        "pair_test_dims": len(res["pair_dims"]),
        "hsic_n_pairs_rejected": hsic_n, "hsic_min_p": hsic_p,
        "max_binned_mi": _offdiag_max(res["mi"]), "mi_n_pairs_rejected": mi_n, "mi_min_p": mi_p,
        "dcor_pairs_tested": len(dcor), "dcor_n_rejected": int(sum(t["rejected"] for t in dcor)),
        "dcor_tests": dcor}
    return {"n_samples": int(n), "n_dims": int(d), "alpha": a, "normality": normality,
            "independence": independence}


def independence_failures(ind: dict[str, Any]) -> list[str]:
    """Names of the dependence tests that reject (each at level alpha, Bonferroni over pairs)."""
    checks = [("linear correlation", ind["n_pairs_over_threshold"]), ("Bartlett", ind["bartlett_rejected"]),
              ("correlation of squares", ind["n_pairs_over_threshold_squares"]),
              ("correlation of |z|", ind["n_pairs_over_threshold_abs"]),
              ("HSIC", ind["hsic_n_pairs_rejected"]), ("binned MI", ind["mi_n_pairs_rejected"]),
              ("distance correlation", ind["dcor_n_rejected"])]
    return [name for name, bad in checks if bad]


def verdict(summary: dict[str, Any]) -> str:
    """A short plain sentence on independence, normality and (when run) reconstruction."""
    bad = independence_failures(summary["independence"])
    nd, d = summary["normality"]["n_dims_failing"], summary["n_dims"]
    parts = [("dimensions look independent (no dependence test rejects)" if not bad
              else f"dimensions are dependent ({', '.join(bad)} reject)"),
             ("every dimension is consistent with N(0,1)" if nd == 0
              else f"{nd} of {d} dimensions are not N(0,1)")]
    rec = summary.get("reconstruction") or {}
    if rec.get("max_abs_error") is not None:
        parts.append(f"round-trip max abs error {rec['max_abs_error']:.2g}")
    text = "; ".join(parts)
    return text[0].upper() + text[1:] + "."


def amari_distance(c: np.ndarray) -> float:
    """Normalised Amari distance in [0, 1] of a square matrix from a scaled permutation (0 = one)."""
    p = np.abs(np.asarray(c, dtype=np.float64))
    k = len(p)
    if k < 2:
        return 0.0
    rows = (p.sum(1) / p.max(1) - 1).sum()
    cols = (p.sum(0) / p.max(0) - 1).sum()
    return float((rows + cols) / (2 * k * (k - 1)))
