"""The exact-score Gaussian mixture the solver cases share (solvers, solver_audit, gmm_defaults): D = 16,
K = 8, VP SDE, seeded; its float64 reference latents by our dopri5 at 1e-10, checked against scipy's DOP853
with an independent numpy score."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from benchmarks.common.measure import Timer
from pflatents.tasks.models.scores import GaussianMixtureScore
from pflatents.tasks.ode.pfode import SolverConfig, encode
from pflatents.tasks.ode.sde import VPSDE

F64 = torch.float64


@dataclass
class Problem:
    sde: VPSDE
    model: GaussianMixtureScore
    x0: torch.Tensor  # (N, D) float64 data
    t_eps: float
    z_ref: torch.Tensor | None = None
    ref_info: dict = field(default_factory=dict)


def make_problem(n: int, d: int = 16, k: int = 8, seed: int = 0, t_eps: float = 1e-5, n_draw: int = 4096) -> Problem:
    """Seeded GMM (means ~ N(0, 4 I), eigenvalues log-uniform in [0.01, 1]) and n of its samples."""
    g = torch.Generator().manual_seed(seed)
    mu = 2.0 * torch.randn(k, d, generator=g, dtype=F64)
    q, _ = torch.linalg.qr(torch.randn(k, d, d, generator=g, dtype=F64))
    lam = torch.exp(torch.empty(k, d, dtype=F64).uniform_(math.log(0.01), 0.0, generator=g))
    cov = q @ torch.diag_embed(lam) @ q.transpose(1, 2)
    cov = 0.5 * (cov + cov.transpose(1, 2))
    w = 0.5 + torch.rand(k, generator=g, dtype=F64)
    w = w / w.sum()
    sde = VPSDE()
    model = GaussianMixtureScore(w, mu, cov, sde)
    comp = torch.multinomial(w, n_draw, replacement=True, generator=g)
    chol = torch.linalg.cholesky(cov)
    x0 = mu[comp] + (chol[comp] @ torch.randn(n_draw, d, 1, generator=g, dtype=F64)).squeeze(-1)
    return Problem(sde, model, x0[:n].contiguous(), t_eps)


def numpy_rhs(p: Problem) -> Callable:
    """Independent float64 numpy PF-ODE in plain t (Cholesky of S_k = alpha^2 C_k + sigma^2 I) for the check."""
    doc = p.model.to_json()
    log_w, mu, cov = np.log(np.asarray(doc["weights"])), np.asarray(doc["means"]), np.asarray(doc["covariances"])
    d = mu.shape[1]
    b0, b1 = p.sde.beta_min, p.sde.beta_max

    def rhs(t: float, x: np.ndarray) -> np.ndarray:
        log_a = -0.25 * t * t * (b1 - b0) - 0.5 * t * b0
        a, s2, beta = math.exp(log_a), -math.expm1(2 * log_a), b0 + t * (b1 - b0)
        chol = np.linalg.cholesky(a * a * cov + s2 * np.eye(d))
        r = x[None] - a * mu
        sol = np.linalg.solve(chol.transpose(0, 2, 1), np.linalg.solve(chol, r[..., None]))[..., 0]
        logits = log_w - 0.5 * (r * sol).sum(1) - np.log(np.diagonal(chol, axis1=1, axis2=2)).sum(1)
        resp = np.exp(logits - logits.max())
        score = -(resp[:, None] * sol).sum(0) / resp.sum()
        return -0.5 * beta * (x + score)

    return rhs


def build_reference(p: Problem, n_check: int = 8) -> None:
    """z_ref by our dopri5 (float64, tol 1e-10); checked against scipy DOP853 (tol 1e-12, plain t, numpy score)."""
    from scipy.integrate import solve_ivp

    cfg = SolverConfig("dopri5", rtol=1e-10, atol=1e-10, t_eps=p.t_eps, max_steps=100_000)
    with Timer() as tm:
        res = encode(p.model, p.sde, p.x0, cfg)
    if not bool(res.ok.all()):
        raise RuntimeError(f"reference integration failed for {(~res.ok).sum().item()} samples")
    p.z_ref = res.x.to(F64)
    rhs = numpy_rhs(p)
    diffs, nfev = [], []
    with Timer() as tc:
        for i in range(n_check):
            sol = solve_ivp(rhs, (p.t_eps, p.sde.T), p.x0[i].numpy(), method="DOP853", rtol=1e-12, atol=1e-12)
            diffs.append(float(np.abs(sol.y[:, -1] - p.z_ref[i].numpy()).max()))
            nfev.append(sol.nfev)
    p.ref_info = dict(method="pflatents dopri5 float64 rtol=atol=1e-10", nfe_mean=res.nfe.double().mean().item(),
                      nfe_max=int(res.nfe.max()), wall_s=tm.wall,
                      check_method="scipy DOP853 rtol=atol=1e-12 in plain t with an independent numpy GMM score",
                      check_samples=n_check, check_max_abs_diff=max(diffs), check_median_abs_diff=statistics.median(diffs),
                      check_nfev_mean=float(np.mean(nfev)), check_wall_s=tc.wall)
