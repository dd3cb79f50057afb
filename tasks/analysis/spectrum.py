"""Degenerate directions of the data, the latent covariance spectrum, and where total correlation lives.

Data that lie on a subspace (constant pixels; patches with their mean removed span 63 of 64 dims)
cannot be mapped onto all of R^D: along a degenerate direction the PF-ODE latents keep a variance far
from 1, and every statistic that includes that direction reports it (max |corr| 1, huge kurtosis,
total correlation). So the analysis works out, from one pass over the data:

- the data's covariance spectrum, its rank and the directions whose variance is below a resolution
  floor: ``rel_floor`` (1e-6) times the largest eigenvalue, and for quantised data with grid step
  ``step`` at least the variance of the quantisation noise itself, ``step^2 / 12`` (a pixel that
  leaves the background in a handful of samples carries less variance than rounding does, and its
  latent is a spike with a few outliers, not a Gaussian); axis-aligned (nearly) constant dims are
  the special case found first, from the per-dim variances;
- a basis of the non-degenerate subspace close to the coordinate axes (constant dims dropped, other
  degenerate directions projected out with the symmetric (Loewdin) orthonormalisation of the
  projected axes), so "coordinate j" still means "about dim j";
- in latent space, the covariance spectrum and the Gaussian total correlation -1/2 log det R split
  into per-eigendirection contributions -1/2 log lambda_i, the largest ones named and compared with
  the degenerate data directions.

Pure numpy / dask.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

__all__ = ["DataSpectrum", "moments_pass", "data_spectrum", "name_direction", "latent_spectrum",
           "CONSTANT_LATENT_VAR"]

CONSTANT_LATENT_VAR = 1e-6  # latent dims with less variance (prior-std units, target ~1) count as constant


@dataclass(frozen=True)
class DataSpectrum:
    """The data's mean and covariance and what they say about degenerate directions."""

    n: int
    mean: np.ndarray            # (D,)
    cov: np.ndarray             # (D, D), ddof 1
    floor: float                # variance below which a direction counts as degenerate
    constant_dims: np.ndarray   # dims whose own variance is below the floor
    degenerate: np.ndarray      # (D, k) orthonormal: all degenerate directions (constant dims first)
    basis: np.ndarray           # (D, rank) orthonormal: the non-degenerate coordinates
    coord_dims: np.ndarray      # (rank,) the data dim each coordinate stays closest to

    @property
    def d(self) -> int:
        return len(self.mean)

    @property
    def rank(self) -> int:
        return self.basis.shape[1]

    @property
    def axis_aligned(self) -> bool:
        """True when every degenerate direction is a constant dim (coordinates = the remaining dims)."""
        return self.degenerate.shape[1] == len(self.constant_dims)


def _comoment_piece(x: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    x = np.asarray(x, dtype=np.float64)
    mean = x.mean(0) if len(x) else np.zeros(x.shape[1])
    c = x - mean
    return len(x), mean, c.T @ c


def _comoment(x: np.ndarray, piece: int = 8192) -> tuple[int, np.ndarray, np.ndarray]:
    """(n, mean, co-moment) of a chunk, in pieces of ``piece`` rows: small float64 temporaries are
    reused by the allocator, where whole-chunk ones cost a page fault per page every time."""
    x = np.asarray(x).reshape(len(x), -1)
    out = _comoment_piece(x[:piece])
    for i in range(piece, len(x), piece):
        out = _merge(out, _comoment_piece(x[i:i + piece]))
    return out


def _merge(a: tuple, b: tuple) -> tuple:
    """Chan's pairwise merge of (n, mean, co-moment)."""
    (na, ma, ca), (nb, mb, cb) = a, b
    if na == 0 or nb == 0:
        return a if nb == 0 else b
    n, d = na + nb, mb - ma
    return n, ma + d * nb / n, ca + cb + np.outer(d, d) * na * nb / n


def moments_pass(x: Any, scheduler: str | None = None) -> tuple[int, np.ndarray, np.ndarray]:
    """(N, mean, covariance with ddof 1) of a dask or numpy array (N, ...) in one tree-reduced pass."""
    import dask
    import dask.array as da

    if isinstance(x, np.ndarray):
        x = da.from_array(x, chunks=(65536, *x.shape[1:]))
    x = x.reshape(x.shape[0], -1) if x.ndim != 2 else x
    parts = [dask.delayed(_comoment)(b) for b in x.rechunk({1: -1}).to_delayed().ravel()]
    while len(parts) > 1:
        parts = [dask.delayed(_merge)(*parts[i:i + 2]) if i + 1 < len(parts) else parts[i]
                 for i in range(0, len(parts), 2)]
    with threadpool_limits(limits=1, user_api="blas"):  # dask runs chunks in parallel; BLAS threads on
        n, mean, c = dask.compute(parts[0], scheduler=scheduler)[0]  # top of them only contend
    return n, mean, c / max(n - 1, 1)


def _loewdin_basis(w: np.ndarray, d: int) -> tuple[np.ndarray, np.ndarray]:
    """Orthonormal basis (d, d - k) of the complement of the columns of ``w`` closest to the axes,
    and the axis each basis vector belongs to."""
    k = w.shape[1]
    p = np.eye(d) - w @ w.T
    drop = np.argsort(-(w ** 2).sum(1))[:k]          # the dims the degenerate directions use most
    keep = np.setdiff1d(np.arange(d), drop)
    m = p[:, keep]
    lam, v = np.linalg.eigh(m.T @ m)
    if lam.min() < 1e-8:                             # the projected axes do not span the complement
        lam_p, u = np.linalg.eigh(p)
        return u[:, lam_p > 0.5], np.argmax(np.abs(u[:, lam_p > 0.5]), axis=0)
    return m @ (v / np.sqrt(lam)) @ v.T, keep


def data_spectrum(n: int, mean: np.ndarray, cov: np.ndarray, quantization: int | None = None,
                  rel_floor: float = 1e-6) -> DataSpectrum:
    """Rank, constant dims, degenerate directions and the non-degenerate basis of data (mean, cov)."""
    cov = np.asarray(cov, dtype=np.float64)
    d = len(cov)
    lam_max = float(max(np.linalg.eigvalsh(cov).max(), 0.0)) if d else 0.0
    floor = rel_floor * lam_max
    if quantization:
        floor = max(floor, (2.0 / (quantization - 1)) ** 2 / 12.0)
    floor = max(floor, np.finfo(np.float64).tiny)
    var = np.diag(cov)
    const = np.flatnonzero(var < floor)
    live = np.setdiff1d(np.arange(d), const)
    lam, u = np.linalg.eigh(cov[np.ix_(live, live)])
    w = u[:, lam < floor]
    eye = np.eye(d)
    deg = np.zeros((d, w.shape[1]))
    deg[live] = w
    degenerate = np.concatenate([eye[:, const], deg], axis=1)
    if w.shape[1] == 0:
        basis, coord = eye[:, live], live
    else:
        sub, axes = _loewdin_basis(w, len(live))
        basis = np.zeros((d, sub.shape[1]))
        basis[live] = sub
        coord = live[axes]
    return DataSpectrum(n, np.asarray(mean, np.float64), cov, float(floor), const, degenerate, basis,
                        np.asarray(coord, np.int64))


def name_direction(v: np.ndarray, support: np.ndarray | None = None) -> str:
    """Words for a unit direction: one dim, the all-ones direction (over ``support``), or its top loadings."""
    v = np.asarray(v, dtype=np.float64)
    v = v / max(np.linalg.norm(v), 1e-300)
    top = np.argsort(-np.abs(v))
    if abs(v[top[0]]) > 0.99:
        return f"dim {int(top[0])}"
    s = np.arange(len(v)) if support is None else np.asarray(support)
    if len(s) > 1:
        cos = abs(v[s].sum()) / np.sqrt(len(s))
        if cos > 0.99:
            return f"the all-ones direction over {len(s)} dims (their sum; cos {cos:.3f})"
    parts = [f"dim {int(j)} ({v[j]:+.2f})" for j in top[:3]]
    return "mostly " + ", ".join(parts)


def _data_summary(spec: DataSpectrum) -> dict[str, Any]:
    """The ``data`` block: rank, floor, constant dims, the degenerate directions in words."""
    live = np.setdiff1d(np.arange(spec.d), spec.constant_dims)
    cov_deg = spec.degenerate.T @ spec.cov @ spec.degenerate
    return {"available": True, "n_samples": int(spec.n), "dims": spec.d, "rank": spec.rank,
            "n_degenerate": int(spec.degenerate.shape[1]), "variance_floor": spec.floor,
            "n_constant_dims": int(len(spec.constant_dims)), "constant_dims": spec.constant_dims.tolist()[:50],
            "degenerate_directions": [
                {"direction": name_direction(spec.degenerate[:, k], live), "data_variance": float(cov_deg[k, k])}
                for k in range(min(spec.degenerate.shape[1], 20))]}


def latent_spectrum(spec: DataSpectrum | None, latent_mean: np.ndarray, latent_cov: np.ndarray,
                    target_var: np.ndarray | None = None, top: int = 3) -> dict[str, Any]:
    """The ``data`` and ``latent`` blocks and the total correlation's per-eigendirection split.

    ``latent_cov`` is the covariance of the latents in prior-std units; ``target_var`` the variance
    the true prior has along each degenerate direction (1 when not given). Latent dims with variance
    below ``CONSTANT_LATENT_VAR`` are counted as constant and left out of the correlation matrix
    (their total correlation is infinite, and says only that they are constant)."""
    cov = np.asarray(latent_cov, dtype=np.float64)
    lam = np.linalg.eigvalsh(cov)
    var = np.diag(cov)
    live = np.flatnonzero(var > CONSTANT_LATENT_VAR)
    sd = np.sqrt(var[live])
    r = cov[np.ix_(live, live)] / np.outer(sd, sd)
    mu, vec = np.linalg.eigh(r)
    mu = np.maximum(mu, 1e-300)
    contrib = -0.5 * np.log(mu)
    deg = None if spec is None else spec.degenerate[live]
    order = np.argsort(-contrib)[:top]
    tops = []
    for k in order:
        item = {"eigenvalue": float(mu[k]), "contribution": float(contrib[k]),
                "direction": name_direction(np.eye(len(var))[:, live] @ vec[:, k], live)}
        if deg is not None and deg.shape[1]:
            item["cos_with_degenerate_data_direction"] = float(np.abs(vec[:, k] @ deg).max())
        tops.append(item)
    latent = {"eigenvalues_min": float(lam.min()), "eigenvalues_max": float(lam.max()),
              "eigenvalues_smallest": np.sort(lam)[:10].tolist(), "n_constant_dims": int(len(var) - len(live)),
              "gaussian_total_correlation_all_dims": float(contrib.sum())}
    out: dict[str, Any] = {"latent": latent, "total_correlation_top": tops, "eigenvalues": np.sort(lam),
                           "data": {"available": False} if spec is None else _data_summary(spec)}
    if spec is not None and spec.degenerate.shape[1]:
        g = spec.degenerate
        v = np.einsum("dk,de,ek->k", g, cov, g)
        m = g.T @ np.asarray(latent_mean, dtype=np.float64)
        tv = np.ones(g.shape[1]) if target_var is None else np.asarray(target_var, dtype=np.float64)
        live_d = np.setdiff1d(np.arange(spec.d), spec.constant_dims)
        latent["degenerate_part"] = [
            {"direction": name_direction(g[:, k], live_d), "latent_variance": float(v[k]),
             "prior_variance": float(tv[k]), "latent_mean": float(m[k])} for k in range(min(g.shape[1], 20))]
    return out
