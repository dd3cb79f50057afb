"""The PF-ODE right-hand side's noise at the working precision, per time: a per-t noise floor.

``rhs_noise_curve`` measures ``RMS|F_lo - F_hi| / RMS|F_hi|`` per sample (its ``quantile`` over the
samples) at ``n_t`` log-spaced times on states ``x_t = alpha(t) x0 + sigma(t) eps`` of a batch (the
ODE's marginals), F_lo being the model and state at the working dtype and F_hi the same in float64.
The result, ``((t_1, level_1), ...)``, is ``SolverConfig.noise_t``: the controller's floor follows the
noise where it is, instead of one level (the worst over t) for the whole run, which near a degenerate
direction at small t is far above the noise elsewhere (docs/solver-audit.md).
"""

from __future__ import annotations

import numpy as np
import torch

from pflatents.tasks.core import Cond, Model, as_model, bcast
from pflatents.tasks.ode.pfode import eps_func, ode_func_t
from pflatents.tasks.ode.sde import SDE

__all__ = ["rhs_noise_curve"]

F64 = torch.float64


@torch.inference_mode()
def rhs_noise_curve(model: Model, model_hi: Model, sde: SDE, x0: torch.Tensor, t_eps: float,
                    dtype: torch.dtype = torch.float32, n_t: int = 12, seed: int = 0,
                    quantile: float = 0.9, ddim: bool = False, cond: Cond = None) -> tuple[tuple[float, float], ...]:
    """((t, relative noise at t), ...) at ``n_t`` log-spaced times from ``t_eps`` to T; () for float64.

    ``x0`` are data samples (a latent model's data are encoded into its ODE space first); ``cond``
    what each row is conditioned on (None: unconditional).
    ``ddim``: of the DDIM form's right-hand side eps_hat (on y = x/alpha) instead of dx/dt: at large t
    dx/dt = f x + g^2/(2 sigma) eps_hat nearly cancels, so its relative noise is larger than eps_hat's.
    The solvers that step on the DDIM form (``EPS_SOLVERS``: adams4, dpm23) need this one."""
    if dtype == F64:
        return ()
    g = torch.Generator().manual_seed(seed)
    x0 = as_model(model_hi, sde).encode_data(x0.to(F64))
    shape = tuple(x0.shape[1:])
    if ddim:
        e_lo, e_hi = eps_func(model, sde, shape, False), eps_func(model_hi, sde, shape, False)
        f_lo = lambda x, t, c: e_lo(x / bcast(sde.alpha(t), x), sde.s_of_t(t), c)  # noqa: E731
        f_hi = lambda x, t, c: e_hi(x / bcast(sde.alpha(t), x), sde.s_of_t(t), c)  # noqa: E731
    else:
        f_lo, f_hi = ode_func_t(model, sde, shape), ode_func_t(model_hi, sde, shape)
    x0 = x0.reshape(x0.shape[0], -1)
    out = []
    for t in np.geomspace(t_eps, sde.T, n_t):
        tt = torch.full((x0.shape[0],), float(t), dtype=F64, device=x0.device)
        eps = torch.randn(x0.shape, generator=g, dtype=F64).to(x0.device)
        xt = bcast(sde.alpha(tt), x0) * x0 + bcast(sde.sigma(tt), x0) * eps
        hi = f_hi(xt, tt, cond)
        lo = f_lo(xt.to(dtype), tt, cond).to(F64)
        rel = (lo - hi).pow(2).mean(1).sqrt() / hi.pow(2).mean(1).sqrt().clamp_min(1e-300)
        out.append((float(t), float(f"{float(torch.quantile(rel.cpu(), quantile)):.2e}")))
    return tuple(out)
