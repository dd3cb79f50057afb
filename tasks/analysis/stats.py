"""One-pass, mergeable statistics of latents against N(0, I): the accumulators and the pass.

Every chunk of rows becomes a small accumulator of float64 sums (central moments, co-moments) and
integer counts (Phi-histogram, contingency tables) with an associative merge (Chan / Pebay), so a
dask tree-reduction gives the same answer however the array is chunked (to rounding; counts exactly).
Before the accumulators see a chunk, an optional affine map ``(x - shift) @ matrix`` takes the
latents to the coordinates that are tested (whitened against the true prior p_T, with the data's
degenerate directions projected out: see ``prior.py`` and ``spectrum.py``). The covariance of the
untransformed rows (for the latent spectrum) comes from the same pass: mapped back through the
inverse when the matrix is square, else from a co-moment of the raw rows kept alongside.
The finishing steps live in ``normality.py``, ``dependence.py`` and ``summary.py``.

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

__all__ = ["StatsConfig", "Plan", "make_plan", "chunk_accum", "merge", "reduce_dask", "finalize",
           "compute_stats", "rff_features"]

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
    shift: np.ndarray | None = None    # (D_in,): subtracted before ``matrix``
    matrix: np.ndarray | None = None   # (D_in, d): the tested coordinates; None = the rows as they are


def make_plan(d_in: int, cfg: StatsConfig, shift: np.ndarray | None = None,
              matrix: np.ndarray | None = None) -> Plan:
    """Seeded choice of the pair-test dims (all when d <= pair_dims) and RFF frequencies w ~ N(0,1);
    ``(x - shift) @ matrix`` (D_in -> d) is applied to every chunk first when given."""
    if matrix is not None:
        matrix = np.asarray(matrix, dtype=np.float64)
        if matrix.ndim != 2 or matrix.shape[0] != d_in:
            raise ValueError(f"transform matrix must be ({d_in}, d); got shape {matrix.shape}")
        shift = np.zeros(d_in) if shift is None else np.asarray(shift, dtype=np.float64)
    d = d_in if matrix is None else matrix.shape[1]
    rng = np.random.default_rng([cfg.seed, 1])
    dims = np.arange(d) if d <= cfg.pair_dims else np.sort(rng.choice(d, cfg.pair_dims, replace=False))
    freqs = np.random.default_rng([cfg.seed, 2]).normal(size=cfg.hsic_freqs)
    return Plan(d, dims, freqs, cfg.phi_bins, cfg.mi_bins, shift, matrix)


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


def rff_features(x: np.ndarray, freqs: np.ndarray) -> np.ndarray:
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
    """The accumulator of one piece of rows (float64); with a transform, also the raw co-moment."""
    extra = {}
    if plan.matrix is not None:
        if plan.matrix.shape[1] < plan.matrix.shape[0]:  # a projection: the raw covariance is lost
            extra["full"] = _comoment(x)
        x = (x - plan.shift) @ plan.matrix
    xp = x[:, plan.pair_dims]
    return {**extra, "mom": _moments(x), "z": _comoment(x), "sq": _comoment(x * x), "abs": _comoment(np.abs(x)),
            "rff": _comoment(rff_features(xp, plan.freqs)), **_phi_counts(x, plan)}


def chunk_accum(block: np.ndarray, plan: Plan) -> dict[str, Any]:
    """Accumulator of a chunk (N_chunk, D), computed in pieces of SUB_ROWS rows."""
    x = np.asarray(block).reshape(len(block), -1)
    if not np.isfinite(x).all():
        raise ValueError("latents hold NaN or Inf values")
    # float64 piece by piece: small temporaries are reused by the allocator, a whole-chunk copy
    # costs a page fault per page on every chunk
    parts = [_accum_rows(np.asarray(x[i:i + SUB_ROWS], dtype=np.float64), plan)
             for i in range(0, max(len(x), 1), SUB_ROWS)]
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
    for key in ("z", "sq", "abs", "rff", "full"):
        if key in a:
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
    """Correlation matrix from a co-moment matrix (0 where a column has no variance)."""
    s = np.sqrt(np.diag(c))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = c / np.outer(s, s)
    return np.nan_to_num(r)


def finalize(acc: dict[str, Any], plan: Plan, cfg: StatsConfig) -> dict[str, Any]:
    """All statistics (arrays) from a merged accumulator."""
    from pflatents.tasks.analysis.dependence import binned_mi, hsic
    from pflatents.tasks.analysis.normality import normality

    n, d = acc["mom"]["n"], plan.d
    out: dict[str, Any] = {"n": n, "d": d, "pair_dims": plan.pair_dims, "normality": normality(acc, cfg.alpha)}
    for key in ("z", "sq", "abs"):
        out[f"corr_{key}"] = _corr(acc[key]["C"])
    out["cov_z"] = acc["z"]["C"] / max(n - 1, 1)
    if "full" in acc:
        out["full_mean"], out["full_cov"] = acc["full"]["mean"], acc["full"]["C"] / max(n - 1, 1)
    elif plan.matrix is not None:  # square: x = y A^-1 + shift
        inv = np.linalg.inv(plan.matrix)
        out["full_mean"], out["full_cov"] = acc["z"]["mean"] @ inv + plan.shift, inv.T @ out["cov_z"] @ inv
    out["hsic"], out["hsic_p"] = hsic(acc, len(plan.pair_dims), 2 * len(plan.freqs))
    out["mi"], out["mi_p"] = binned_mi(acc["table"], len(plan.pair_dims), plan.mi_bins)
    return out


def compute_stats(x: Any, cfg: StatsConfig = StatsConfig(), scheduler: str | None = None,
                  shift: np.ndarray | None = None, matrix: np.ndarray | None = None) -> dict[str, Any]:
    """One pass over a (dask or numpy) array (N, ...) -> every one-pass statistic of
    ``(x - shift) @ matrix`` (of ``x`` itself without a matrix)."""
    import dask.array as da

    if isinstance(x, np.ndarray):
        x = da.from_array(x, chunks=(65536, *x.shape[1:]))
    plan = make_plan(int(np.prod(x.shape[1:])), cfg, shift, matrix)
    return finalize(reduce_dask(x, plan, scheduler), plan, cfg)

