"""Latent stability: re-encode stored samples with a setting about 10x more accurate and measure the drift.

``tighter(cfg)`` is the pinned solver made ~10x more accurate: an adaptive solver's tolerances / 100
(dopri5's error falls like tol^(5/6)..tol, so /100 buys >= 10x; measured on the learned-model
benchmark), a fixed-step solver's step count x 4 (rk4: 4^4 = 256x, heun: 16x, dpmpp2m: 16x).
``drift`` compares the stored latents with the re-encoded ones per sample (max-abs over dimensions)
and names the worst samples and dimensions. Pure numpy/torch: callers read the rows and pin nothing.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from pflatents.tasks.ode.pfode import SolverConfig

__all__ = ["tighter", "drift", "DEFAULT_TARGET"]

DEFAULT_TARGET = 1e-3  # per-sample p99 latent error a store is held to when it pinned no --latent-tol


def tighter(cfg: SolverConfig) -> SolverConfig:
    """The pinned setting made about 10x more accurate (module docstring)."""
    if cfg.adaptive:
        return dataclasses.replace(cfg, rtol=cfg.rtol / 100, atol=cfg.atol / 100, max_steps=max(cfg.max_steps, 50_000))
    return dataclasses.replace(cfg, steps=cfg.steps * 4)


def drift(stored: np.ndarray, again: np.ndarray, index: np.ndarray, target: float | None,
          worst: int = 5) -> dict:
    """Per-sample max-abs drift between stored latents and a more accurate re-encode.

    ``index`` holds the samples' row numbers in the store. Returns ``p50``, ``p99``, ``max``,
    ``target``, ``meets_target`` (p99 <= target), the ``worst`` samples (row, drift, dimension) and
    the dimensions that carry the largest drift most often.
    """
    a = np.asarray(stored, dtype=np.float64).reshape(len(index), -1)
    b = np.asarray(again, dtype=np.float64).reshape(len(index), -1)
    diff = np.abs(a - b)
    finite = np.isfinite(diff).all(axis=1)
    per = np.where(finite, diff.max(axis=1, initial=0.0), np.inf)
    arg = np.where(finite, np.nan_to_num(diff, posinf=0.0).argmax(axis=1), -1)
    order = np.argsort(-per)[:worst]
    dims, counts = np.unique(arg[arg >= 0], return_counts=True)
    top = dims[np.argsort(-counts)][:worst]
    p99 = float(np.quantile(per, 0.99))
    tgt = DEFAULT_TARGET if target is None else float(target)
    return {"n": int(len(index)), "p50": float(np.median(per)), "p99": p99, "max": float(per.max()),
            "target": tgt, "meets_target": bool(p99 <= tgt),
            "worst_samples": [{"row": int(index[i]), "drift": float(per[i]), "dim": int(arg[i])} for i in order],
            "worst_dims": [int(d) for d in top]}
