"""Reconstruction checks: decode stored latents, compare with the data; exact Gaussian latents.

Pure torch/numpy (no Prefect, no zarr). The round trip x -> z -> x' understates the encode error
(encode and decode errors partly cancel, docs/statistics.md), so where an exact flow map exists
(a single Gaussian) the encode error is measured against it separately.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from pflatents.tasks.ode.batches import decode_block
from pflatents.tasks.ode.pfode import SolverConfig
from pflatents.tasks.ode.sde import SDE

__all__ = ["exact_gaussian_latents", "gaussian_params", "read_rows", "sample_errors",
           "requantise_exact", "reconstruct_rows", "subset_indices", "error_summary"]


def _alpha_sigma(sde: SDE, t: float) -> tuple[float, float]:
    """alpha(t) and sigma(t) as floats."""
    tt = torch.tensor([t], dtype=torch.float64)
    return float(sde.alpha(tt)[0]), float(sde.sigma(tt)[0])


def exact_gaussian_latents(x0: np.ndarray, mu: np.ndarray, cov: np.ndarray, sde: SDE, t_eps: float
                           ) -> np.ndarray:
    """Exact PF-ODE map t_eps -> T of N(mu, cov) data (docs/math.md closed form):
    x_T = alpha_T mu + U diag(sqrt(v_T / v_s)) U^T (x_s - alpha_s mu), v_t = alpha_t^2 lam + sigma_t^2."""
    x = np.asarray(x0, dtype=np.float64).reshape(len(x0), -1)
    lam, u = np.linalg.eigh(np.asarray(cov, dtype=np.float64))
    a_s, s_s = _alpha_sigma(sde, t_eps)
    a_t, s_t = _alpha_sigma(sde, sde.T)
    scale = np.sqrt((a_t ** 2 * lam + s_t ** 2) / (a_s ** 2 * lam + s_s ** 2))
    mu = np.asarray(mu, dtype=np.float64)
    z = a_t * mu + ((x - a_s * mu) @ u * scale) @ u.T
    return z.reshape(np.shape(x0))


def gaussian_params(model: Any) -> tuple[np.ndarray, np.ndarray] | None:
    """(mu, cov) of a score model that is a single Gaussian (a K = 1 GMM), else None."""
    if getattr(model, "n_components", None) != 1:
        return None
    u, lam = model.U[0].double(), model.lam[0].double()
    return model.mu[0].double().numpy(), (u @ torch.diag(lam) @ u.T).numpy()


def read_rows(source: Any, index: np.ndarray) -> np.ndarray:
    """Rows ``index`` (sorted) of a source, read as contiguous runs."""
    index = np.asarray(index, dtype=np.int64)
    if len(index) == 0:
        return np.empty((0, *source.sample_shape), dtype=np.float32)
    breaks = np.flatnonzero(np.diff(index) != 1) + 1
    runs = np.split(index, breaks)
    return np.concatenate([source.read(int(r[0]), int(r[-1]) + 1).x for r in runs])


def sample_errors(x: np.ndarray, x_hat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample max-abs error and RMSE (float64)."""
    diff = (np.asarray(x_hat, np.float64) - np.asarray(x, np.float64)).reshape(len(x), -1)
    return np.abs(diff).max(1), np.sqrt((diff ** 2).mean(1))


def requantise_exact(x: np.ndarray, x_hat: np.ndarray, levels: int) -> np.ndarray:
    """Per sample: does rounding x_hat to the grid -1 + 2k/(levels-1) give back x exactly?"""
    def grid(v: np.ndarray) -> np.ndarray:
        k = np.rint((np.asarray(v, np.float64) + 1.0) * (levels - 1) / 2.0)
        return np.clip(k, 0, levels - 1).reshape(len(v), -1)
    return (grid(x) == grid(x_hat)).all(1)


def reconstruct_rows(model: Any, sde: SDE, z: np.ndarray, x: np.ndarray, solver: SolverConfig,
                     batch_size: int, device: torch.device, dtype: str,
                     quantization: int | None, labels: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Decode latents ``z`` and compare with the data ``x``: per-sample errors, NFE, status. ``labels``
    (int64, one per row) condition a class-conditional model, row i on labels[i] as extraction did."""
    x_hat, nfe, status = decode_block(model, sde, z, solver, batch_size, device, dtype, labels)
    max_abs, rmse = sample_errors(x, x_hat)
    out = {"recon_max_abs": max_abs, "recon_rmse": rmse, "recon_nfe": nfe.astype(np.float64),
           "recon_status": status.astype(np.float64)}
    if quantization is not None:
        out["recon_requantised_exact"] = requantise_exact(x, x_hat, quantization).astype(np.float64)
    gauss = gaussian_params(model)
    if gauss is not None:
        exact = exact_gaussian_latents(x, *gauss, sde, solver.t_eps)
        out["encode_max_abs"], out["encode_rmse"] = sample_errors(exact, z)
    return out


def subset_indices(rows: np.ndarray, n: int | None, seed: int) -> np.ndarray:
    """A seeded, sorted subset of ``n`` of ``rows`` (all when ``n`` is None or >= len(rows))."""
    rows = np.asarray(rows, dtype=np.int64)
    if n is None or n >= len(rows):
        return rows
    return np.sort(np.random.default_rng([seed, 5]).choice(rows, n, replace=False))


def error_summary(index: np.ndarray, values: dict[str, np.ndarray], worst: int = 10) -> dict[str, Any]:
    """Quantiles of the per-sample errors, the worst samples, re-quantisation and encode errors."""
    err, rmse = values["recon_max_abs"], values["recon_rmse"]
    q = {f"p{int(p)}": float(np.quantile(err, p / 100)) for p in (50, 90, 99)}
    order = np.argsort(-err)[:worst]
    out: dict[str, Any] = {
        "n_checked": int(len(err)), "max_abs_error": float(err.max()), "rmse": float(np.sqrt((rmse ** 2).mean())),
        "max_abs_error_quantiles": {**q, "max": float(err.max())},
        "worst_samples": [{"sample": int(index[k]), "max_abs_error": float(err[k]),
                           "rmse": float(rmse[k])} for k in order],
        "mean_nfe": float(values["recon_nfe"].mean()),
        "n_solver_failures": int((values["recon_status"] != 0).sum())}
    if "recon_requantised_exact" in values:
        out["fraction_requantised_exact"] = float(values["recon_requantised_exact"].mean())
    if "encode_max_abs" in values:
        out["encode_max_abs_error"] = float(values["encode_max_abs"].max())
        out["encode_rmse"] = float(np.sqrt((values["encode_rmse"] ** 2).mean()))
    return out
