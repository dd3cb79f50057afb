"""Pilot measurements before an extraction: the right-hand side's noise floor, and the cheapest
solver setting that meets a per-sample latent error target.

- ``rhs_noise``: how noisy the PF-ODE's right-hand side is at the working precision, measured as
  ``RMS|F_lo - F_hi| / RMS|F_hi|`` per sample on states ``x_t = alpha(t) x0 + sigma(t) eps`` of a pilot
  batch (the ODE's marginals at t), where F_lo is the model and state at the working dtype and F_hi the
  same in float64 (a float64 twin of the network, or the exact score evaluated in float64). The
  solver's controller uses it as a floor (``Control.noise``), so a tolerance below what a float32
  network can deliver costs no extra steps.
- ``choose``: a pilot on a seeded subset: every candidate setting encodes it; the errors against a
  much tighter run give per-sample p50 / p99 / max; the cheapest candidate (mean NFE) whose p99 meets
  the target is chosen. Pure torch, no Prefect or storage: callers pin what it returns.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch

from pflatents.tasks.core import Model as ScoreModel, bcast as _bcast
from pflatents.tasks.errors import SolverError
from pflatents.tasks.ode.pfode import SolverConfig, encode, ode_func_t
from pflatents.tasks.ode.sde import SDE

__all__ = ["rhs_noise", "PilotResult", "choose", "candidates", "reference_config"]

F64 = torch.float64


@torch.inference_mode()
def rhs_noise(model: ScoreModel, model_hi: ScoreModel, sde: SDE, x0: torch.Tensor, t_eps: float,
              dtype: torch.dtype = torch.float32, n_t: int = 12, seed: int = 0, quantile: float = 0.9) -> float:
    """Relative noise of the right-hand side at ``dtype`` against float64 (see the module docstring).

    Returns the largest over ``n_t`` log-spaced times of the ``quantile`` over samples. 0 for a
    float64 working dtype (the reference itself).
    """
    if dtype == F64:
        return 0.0
    g = torch.Generator().manual_seed(seed)
    shape = tuple(x0.shape[1:])
    f_lo, f_hi = ode_func_t(model, sde, shape), ode_func_t(model_hi, sde, shape)
    x0 = x0.to(F64).reshape(x0.shape[0], -1)
    worst = 0.0
    for t in np.geomspace(t_eps, sde.T, n_t):
        tt = torch.full((x0.shape[0],), float(t), dtype=F64)
        eps = torch.randn(x0.shape, generator=g, dtype=F64)
        xt = _bcast(sde.alpha(tt), x0) * x0 + _bcast(sde.sigma(tt), x0) * eps
        hi = f_hi(xt, tt)
        lo = f_lo(xt.to(dtype), tt).to(F64)
        rel = (lo - hi).pow(2).mean(1).sqrt() / hi.pow(2).mean(1).sqrt().clamp_min(1e-300)
        worst = max(worst, float(torch.quantile(rel, quantile)))
    return worst


@dataclass
class PilotResult:
    """The chosen setting and every candidate's figures (JSON-able through ``to_dict``)."""

    target: float
    choice: SolverConfig | None
    met: bool
    rows: list[dict]
    n: int
    reference: dict

    def to_dict(self) -> dict:
        return {"target": self.target, "met": self.met, "n": self.n, "reference": self.reference,
                "choice": self.choice.to_dict() if self.choice is not None else None, "candidates": self.rows}


def candidates(t_eps: float, noise: float = 0.0) -> list[SolverConfig]:
    """The settings a pilot tries: dopri5 (latent-unit control, with and without the noise floor) on a
    tolerance ladder, and rk4 on the log-SNR grid (on the learned-model benchmark the cheaper at p99
    1e-2..1e-3 on two of three models)."""
    tols = (1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 3e-5, 1e-5, 3e-6, 1e-6)
    # the floor is one level for the whole run (the worst over t): where the noise is large only near
    # t_eps (a degenerate direction) it costs accuracy elsewhere, so the pilot also tries no floor
    floors = (noise, 0.0) if noise > 0 else (0.0,)
    return ([SolverConfig("dopri5", rtol=tol, atol=tol, t_eps=t_eps, time_var="t", control="latent", noise=nz)
             for nz in floors for tol in tols]
            + [SolverConfig("rk4", steps=n, grid="logsnr", t_eps=t_eps) for n in (16, 32, 64, 128)])


def reference_config(t_eps: float) -> SolverConfig:
    """The much tighter run the pilot measures against (latent control, tol 1e-7, float64 state)."""
    return SolverConfig("dopri5", rtol=1e-7, atol=1e-7, t_eps=t_eps, time_var="t", control="latent",
                        max_steps=100_000)


@torch.inference_mode()
def choose(model: ScoreModel, sde: SDE, x0: torch.Tensor, target: float, cands: list[SolverConfig],
           dtype: torch.dtype = torch.float32, model_ref: ScoreModel | None = None,
           ref_cfg: SolverConfig | None = None) -> PilotResult:
    """Encode the pilot batch with every candidate; pick the cheapest whose per-sample p99 error <= target.

    The reference is ``ref_cfg`` (default ``reference_config``) with ``model_ref`` (default ``model``) in
    float64. When no candidate meets the target, ``choice`` is the most accurate one and ``met`` is False.
    """
    if not (isinstance(target, (int, float)) and math.isfinite(target) and target > 0):
        raise SolverError(f"the latent error target must be a number > 0; got {target!r}")
    if not cands:
        raise SolverError("the pilot needs at least one candidate setting")
    ref_cfg = ref_cfg or reference_config(cands[0].t_eps)
    ref = encode(model_ref or model, sde, x0.to(F64), ref_cfg)
    z_ref = ref.x.reshape(x0.shape[0], -1)
    rows = []
    for cfg in cands:
        r = encode(model, sde, x0.to(dtype), cfg)
        err = (r.x.to(F64).reshape(x0.shape[0], -1) - z_ref).abs().amax(1)
        err = torch.where(r.ok, err, torch.full_like(err, math.inf))
        e = err.numpy()
        rows.append({"setting": cfg.to_dict(), "nfe_mean": float(r.nfe.double().mean()),
                     "p50": float(np.median(e)), "p99": float(np.quantile(e, 0.99)), "max": float(e.max()),
                     "failed": int((~r.ok).sum())})
    ok = [i for i, row in enumerate(rows) if row["p99"] <= target]
    if ok:
        best = min(ok, key=lambda i: rows[i]["nfe_mean"])
    else:
        best = min(range(len(rows)), key=lambda i: rows[i]["p99"])
    refinfo = {"setting": ref_cfg.to_dict(), "nfe_mean": float(ref.nfe.double().mean()), "dtype": "float64"}
    return PilotResult(target, dataclasses.replace(cands[best]), bool(ok), rows, int(x0.shape[0]), refinfo)


PILOT_N, PILOT_SEED = 128, 0


def pilot_subset(source, n: int = PILOT_N, seed: int = PILOT_SEED) -> np.ndarray:
    """A seeded subset of ``n`` samples of a source (all of them when it has fewer), in index order."""
    total = len(source)
    idx = np.sort(np.random.default_rng(seed).choice(total, size=min(n, total), replace=False))
    return np.concatenate([source.read(int(i), int(i) + 1).x for i in idx]).astype(np.float64)


def latent_pilot(work: ScoreModel, hi: ScoreModel, sde: SDE, source, t_eps: float, dtype: str, target: float,
                 n: int = PILOT_N, seed: int = PILOT_SEED) -> tuple[SolverConfig, dict]:
    """``--latent-tol``: measure the right-hand side's noise, run the pilot, return (choice, pinned record).

    ``work`` is the model at the job's precision (the working one) and ``hi`` the same in float64
    (``fp64``; an exact score in a float64 state), for the reference and the noise floor. The record
    holds the target, the choice, whether it met the target, the noise floor and every candidate's
    p50 / p99 / max and NFE.
    """
    x = torch.from_numpy(pilot_subset(source, n, seed))
    dt = F64 if dtype == "float64" else torch.float32
    noise = float(f"{rhs_noise(work, hi, sde, x, t_eps, dt):.1e}")  # 2 digits: a stable pinned value
    res = choose(work, sde, x, target, candidates(t_eps, noise), dt, model_ref=hi)
    rec = {**res.to_dict(), "seed": seed, "noise": noise}
    return res.choice, rec


def describe(rec: dict) -> str:
    """One line for the CLI: what the pilot chose and why."""
    if "skipped" in rec:
        return f"latent-tol {rec['target']:g}: no pilot ({rec['skipped']} given)"
    ch = rec.get("choice") or {}
    row = next((r for r in rec.get("candidates", []) if r["setting"] == ch), None)
    what = (f"{ch.get('name')} tol {ch.get('rtol'):g}" if ch.get("rtol") is not None
            else f"{ch.get('name')} {ch.get('steps')} steps ({ch.get('grid')} grid)")
    figs = f" (pilot p99 {row['p99']:.1e}, max {row['max']:.1e}, {row['nfe_mean']:.0f} NFE/sample)" if row else ""
    if rec.get("met"):
        return f"latent-tol {rec['target']:g}: pilot on {rec['n']} samples chose {what}{figs}"
    return (f"latent-tol {rec['target']:g}: NOT met by any candidate on {rec['n']} pilot samples; using the most "
            f"accurate, {what}{figs}: this model's latents cannot be made that reproducible at this precision")
