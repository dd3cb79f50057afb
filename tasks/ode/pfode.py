"""Encode and decode with the probability-flow ODE: x0 at t_eps <-> z = x(T).

``encode`` integrates from ``t_eps`` to ``T`` with ``x(t_eps) = x0``; ``decode`` integrates from ``T``
back to the **same** ``t_eps`` with no extra denoising step, so the round trip can close.
The adaptive solver steps in the SDE's own time t by default (``time_var="s"``: in s = log(sigma/alpha),
the default for a discrete diffusers schedule);
fixed-step solvers step on grids in s (see ``pflatents.tasks.ode.sde``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from pflatents.tasks.core import Cond, Model, as_model, bcast as _bcast
from pflatents.tasks.ode import solvers as S
from pflatents.tasks.errors import SolverError
from pflatents.tasks.ode.sde import SDE

__all__ = ["SolverConfig", "PFResult", "encode", "decode", "integrate", "make_grid", "SOLVERS", "Solver", "ODEProblem",
           "SOLVER_NAMES", "ADAPTIVE", "GRIDS"]

F64 = torch.float64
GRIDS = ("logsnr", "edm", "time")
# what the adaptive solver steps in: the SDE's own t, s = log(sigma/alpha), or "auto" = the SDE's choice
# (t for vp/ve/edm; s for a discrete diffusers schedule, whose coefficients are piecewise in t)
TIME_VARS = ("auto", "t", "s")
# what the adaptive solver's tolerance bounds: each step's local error ("local", the classical control),
# or its contribution to the latent ("latent": on encode the tolerance at t is weighted by
# sigma(t)/sigma(T), the bound on how much the flow from t to T amplifies an error; decode is unweighted)
CONTROLS = ("local", "latent")


@dataclass(frozen=True)
class SolverConfig:
    """How to integrate: solver name, tolerances (adaptive) or step count (fixed), grid, t_eps."""

    name: str = "dopri5"
    rtol: float = 1e-6
    atol: float = 1e-6
    steps: int = 50
    grid: str = "logsnr"
    t_eps: float = 1e-4
    max_steps: int = 10_000
    time_var: str = "auto"
    control: str = "local"  # extract picks latent for networks (pflatents.tasks.config.build_config)
    noise: float = 0.0  # relative noise level of the right-hand side (pflatents.tasks.ode.solvers.Control)

    def __post_init__(self) -> None:
        if self.name not in SOLVER_NAMES:
            raise SolverError(f"unknown solver {self.name!r}; choose one of {', '.join(SOLVER_NAMES)}")
        if self.grid not in GRIDS:
            raise SolverError(f"unknown time grid {self.grid!r}; choose one of {', '.join(GRIDS)}")
        if self.time_var not in TIME_VARS:
            raise SolverError(f"unknown time variable {self.time_var!r}; choose one of {', '.join(TIME_VARS)}")
        if self.control not in CONTROLS:
            raise SolverError(f"unknown error control {self.control!r}; choose one of {', '.join(CONTROLS)}")
        if self.adaptive:
            S.Control(self.rtol, self.atol, max_steps=self.max_steps, noise=self.noise)  # validates
        elif not (isinstance(self.steps, int) and not isinstance(self.steps, bool) and self.steps >= 1):
            raise SolverError(f"steps must be an integer >= 1 for the fixed-step solver {self.name!r}; got {self.steps!r}")
        if not (isinstance(self.t_eps, (int, float)) and math.isfinite(self.t_eps) and self.t_eps > 0):
            raise SolverError(f"t_eps must be a finite number > 0; got {self.t_eps!r}")

    @property
    def adaptive(self) -> bool:
        return SOLVERS[self.name].adaptive

    def to_dict(self) -> dict:
        """The settings that decide the result (tolerances for adaptive, steps/grid for fixed)."""
        d = {"name": self.name, "t_eps": self.t_eps}
        if self.adaptive:
            d.update(rtol=self.rtol, atol=self.atol, max_steps=self.max_steps, time_var=self.time_var)
            # the extensions appear only when used, so configs pinned before them (local control, no
            # noise floor) keep their hash; a dict without "control" means local
            if self.control != "local":
                d["control"] = self.control
            if self.noise:
                d["noise"] = self.noise
        else:
            d.update(steps=self.steps, grid=self.grid)
        return d


@dataclass
class PFResult:
    """Result of encode/decode: states shaped like the input, NFE and status per sample.

    ``logp`` (nats, of the input under the model) and ``bpd`` are set only when the likelihood was asked for.
    """

    x: torch.Tensor
    nfe: torch.Tensor
    status: torch.Tensor
    logp: torch.Tensor | None = None
    bpd: torch.Tensor | None = None

    @property
    def ok(self) -> torch.Tensor:
        return self.status == S.OK


def ode_func(model: Model, sde: SDE, sample_shape: tuple[int, ...]) -> Callable:
    """F(y, s[, cond]) = dx/ds = dlog(alpha)/ds x - sigma^2 score, on flat states (B, M)."""
    model = as_model(model, sde)

    def F(y: torch.Tensor, s: torch.Tensor, cond: Cond = None) -> torch.Tensor:
        t = sde.t_of_s(s)
        x = y.reshape(y.shape[0], *sample_shape)
        s2score = model.sigma2_score(x, t, cond)
        return (_bcast(sde.dlog_alpha_ds(t), x) * x - s2score).reshape(y.shape)

    return F


def ode_func_t(model: Model, sde: SDE, sample_shape: tuple[int, ...]) -> Callable:
    """G(y, t) = dx/dt, the model's ``velocity`` (``Model``), on flat states (B, M); t per sample.

    For a score model that is f(t) x - g(t)^2/(2 sigma^2) (sigma^2 score) (``ModelBase.velocity``), the
    same ODE as ``ode_func`` with ds/dt = g^2 / (2 sigma^2) applied; in plain t the VP flow needs ~26 %
    fewer dopri5 score evaluations than in s for the same worst latent error
    (benchmarks/cases/solver_audit.py; docs/solver-audit.md). A velocity network gives its prediction, finite
    where alpha = 0 (flow matching's T).
    """
    model = as_model(model, sde)

    def G(y: torch.Tensor, t: torch.Tensor, cond: Cond = None) -> torch.Tensor:
        return model.velocity(y.reshape(y.shape[0], *sample_shape), t, cond).reshape(y.shape)

    return G


def make_grid(sde: SDE, t_start: float, t_end: float, steps: int, kind: str = "logsnr", rho: float = 7.0) -> torch.Tensor:
    """s values from t_start to t_end: uniform in s (log-SNR), EDM rho-spacing in sigma/alpha, or uniform in t."""
    lo, hi = sorted((t_start, t_end))
    u = torch.linspace(0.0, 1.0, steps + 1, dtype=F64)
    s_lo, s_hi = sde.s_of_t(torch.tensor(lo, dtype=F64)), sde.s_of_t(torch.tensor(hi, dtype=F64))
    if kind == "logsnr":
        g = s_lo + u * (s_hi - s_lo)
    elif kind == "edm":
        r_lo, r_hi = torch.exp(s_lo / rho), torch.exp(s_hi / rho)
        g = rho * torch.log(r_lo + u * (r_hi - r_lo))
    elif kind == "time":
        g = sde.s_of_t(lo + u * (hi - lo))
    else:
        raise SolverError(f"unknown time grid {kind!r}; choose one of {', '.join(GRIDS)}")
    g[0], g[-1] = s_lo, s_hi
    return g if t_start <= t_end else g.flip(0)


def _data_pred(model: Model, sde: SDE, x: torch.Tensor, t: torch.Tensor, cond: Cond = None) -> torch.Tensor:
    """x0_hat = (x + sigma^2 score) / alpha (Tweedie)."""
    return (x + model.sigma2_score(x, t, cond)) / _bcast(sde.alpha(t), x)


def solve_dpmpp2m(model: Model, sde: SDE, x: torch.Tensor, grid: torch.Tensor, cond: Cond = None) -> S.SolveResult:
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2) in lambda = -s, either direction.

    x_{i+1} = (sigma_{i+1}/sigma_i) x_i - alpha_{i+1} (e^{-h} - 1) D_i, D_i a 2nd-order multistep
    combination of the last two data predictions; exact for the linear part of the ODE.
    """
    b, model = x.shape[0], as_model(model, sde)
    ts = sde.t_of_s(grid)
    lam, alpha, sigma = -grid, sde.alpha(ts), sde.sigma(ts)
    d_prev, h_prev = None, None
    for i in range(len(grid) - 1):
        d = _data_pred(model, sde, x, ts[i].expand(b).to(x.device), cond)
        h = (lam[i + 1] - lam[i]).item()
        if d_prev is None:
            dd = d  # first step: DDIM (1st order)
        else:
            c = h / (2 * h_prev)  # 1 / (2 r), r = h_prev / h
            dd = (1 + c) * d - c * d_prev
        x = (sigma[i + 1] / sigma[i]).item() * x - alpha[i + 1].item() * math.expm1(-h) * dd
        d_prev, h_prev = d, h
    nfe = torch.full((b,), len(grid) - 1, dtype=torch.int64, device=x.device)
    status = torch.where(torch.isfinite(x.reshape(b, -1)).all(1), S.OK, S.NONFINITE).to(torch.int8)
    return S.SolveResult(x.reshape(b, -1), nfe, status, nfe.clone())


def rademacher(sample_index: torch.Tensor, dim: int, seed: int) -> torch.Tensor:
    """Per-sample seeded +-1 probes (splitmix64 of (seed, sample, dim)): independent of batching."""
    idx = sample_index.detach().cpu().numpy().astype(np.uint64)
    with np.errstate(over="ignore"):
        z = (np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15)
             + idx[:, None] * np.uint64(dim) + np.arange(dim, dtype=np.uint64)[None]
             + np.uint64(0x632BE59BD9B4E019))
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return torch.from_numpy(np.where(z >> np.uint64(63), 1.0, -1.0))


def _augment(F: Callable, hutchinson: bool, m: int) -> Callable:
    """Augmented ODE [dx/ds, div_x(dx/ds)(, de/ds = 0)]: Hutchinson with probes e, or the exact trace.

    The probes ride along in the state (columns m+1:, zero derivative) because the adaptive solver
    passes only its still-active rows to G: each row must carry its own sample's probe.
    """

    def G(y: torch.Tensor, s: torch.Tensor, cond: Cond = None) -> torch.Tensor:
        with torch.enable_grad():
            x = y[:, :m].detach().requires_grad_(True)
            v = S.call(F, x, s, cond)
            if not hutchinson:
                div = sum(torch.autograd.grad(v[:, j].sum(), x, retain_graph=j < m - 1)[0][:, j] for j in range(m))
            else:
                e = y[:, m + 1:]
                div = (torch.autograd.grad(v, x, e)[0] * e).sum(1)
        parts = [v.detach(), div.detach()[:, None]] + ([torch.zeros_like(e)] if hutchinson else [])
        return torch.cat(parts, dim=1)

    return G


def _latent_weight(sde: SDE, t_start: float, t_end: float, in_t: bool) -> Callable | None:
    """Encode (t increasing): tolerance factor sigma(t)/sigma(t_end) at the solver's time (t or s); decode: None.

    For Gaussian data N(mu, C) the flow from t to T scales the eigendirection of C with eigenvalue lam
    by sqrt((alpha_T^2 lam + sigma_T^2) / (alpha_t^2 lam + sigma_t^2)) <= max(alpha_T/alpha_t, sigma_T/sigma_t);
    sharp (near-degenerate or quantised) directions reach sigma_T/sigma_t. Weighting the tolerance by
    its inverse makes it a bound on each step's share of the latent error.
    """
    if t_end <= t_start:
        return None
    sig_end = float(sde.sigma(torch.tensor(t_end, dtype=F64)))

    def w(v: torch.Tensor) -> torch.Tensor:
        t = v if in_t else sde.t_of_s(v)
        return (sde.sigma(t.to(F64)) / sig_end).clamp(max=1.0)

    return w


# ---- the solver table ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ODEProblem:
    """What every solver gets: the flat state ``y0`` (B, M) (with the likelihood's extra columns when
    asked), the right-hand side ``F(y, u[, cond])`` in the solver's time variable ``u`` (s = log(sigma/alpha),
    or t for an adaptive solver stepping in t: ``in_t``), the span in t and in u, the sample shape, the
    model and SDE (for solvers that use the data prediction, like dpmpp2m) and the rows' ``cond``."""

    model: Model
    sde: SDE
    F: Callable
    y0: torch.Tensor
    shape: tuple[int, ...]
    t_start: float
    t_end: float
    u_start: float
    u_end: float
    in_t: bool
    cond: Cond = None


@dataclass(frozen=True)
class Solver:
    """One entry of the solver table: ``run(problem, cfg) -> SolveResult``; ``adaptive`` solvers take
    tolerances (the others a step count and a grid); ``likelihood``: it can carry the augmented state."""

    name: str
    run: Callable[[ODEProblem, "SolverConfig"], S.SolveResult]
    adaptive: bool = False
    likelihood: bool = True


def _grid(p: ODEProblem, cfg: "SolverConfig") -> torch.Tensor:
    if p.in_t:  # an SDE with alpha = 0 at T (flow): fixed steps uniform in t (--grid time)
        g = torch.linspace(p.t_start, p.t_end, cfg.steps + 1, dtype=F64)
        g[0], g[-1] = p.t_start, p.t_end
        return g
    return make_grid(p.sde, p.t_start, p.t_end, cfg.steps, cfg.grid)


def _run_rk(p: ODEProblem, cfg: "SolverConfig") -> S.SolveResult:
    return S.solve_fixed(p.F, p.y0, _grid(p, cfg), S.TABLEAUS[cfg.name], p.cond)


def _run_adaptive(p: ODEProblem, cfg: "SolverConfig") -> S.SolveResult:
    weight = _latent_weight(p.sde, p.t_start, p.t_end, p.in_t) if cfg.control == "latent" else None
    ctl = S.Control(cfg.rtol, cfg.atol, max_steps=cfg.max_steps, weight=weight, noise=cfg.noise)
    return S.solve_adaptive(p.F, p.y0, p.u_start, p.u_end, ctl, S.TABLEAUS[cfg.name], p.cond)


def _run_dpmpp2m(p: ODEProblem, cfg: "SolverConfig") -> S.SolveResult:
    x = p.y0.reshape(p.y0.shape[0], *p.shape)
    return solve_dpmpp2m(p.model, p.sde, x, _grid(p, cfg), p.cond)


# name -> solver, in the order the CLI lists them
SOLVERS: dict[str, Solver] = {
    "euler": Solver("euler", _run_rk),
    "heun": Solver("heun", _run_rk),
    "rk4": Solver("rk4", _run_rk),
    "dopri5": Solver("dopri5", _run_adaptive, adaptive=True),
    "dpmpp2m": Solver("dpmpp2m", _run_dpmpp2m, likelihood=False),
}
SOLVER_NAMES = tuple(SOLVERS)
ADAPTIVE = tuple(n for n, v in SOLVERS.items() if v.adaptive)
MULTISTEP = tuple(n for n, v in SOLVERS.items() if not v.likelihood)


def integrate(model: Model, sde: SDE, x: torch.Tensor, t_start: float, t_end: float,
              cfg: SolverConfig, likelihood: str | None = None, seed: int = 0,
              sample_index: torch.Tensor | None = None, cond: Cond = None) -> PFResult:
    """Integrate the PF-ODE from t_start to t_end for a batch x (B, ...), conditioned on ``cond``
    (None, or int64 labels (B,): pflatents.tasks.core).

    likelihood: None (default, no cost), "hutchinson" (Rademacher probes seeded per sample) or
    "exact" (full Jacobian trace, M backward passes; for tests and small D).
    """
    if x.ndim < 2 or x.shape[0] == 0:
        raise SolverError(f"expected a non-empty batch of shape (B, ...); got {tuple(x.shape)}")
    b, shape = x.shape[0], tuple(x.shape[1:])
    m = math.prod(shape)
    solver = SOLVERS[cfg.name]
    tv = sde.preferred_time_var if cfg.time_var == "auto" else cfg.time_var
    in_t = solver.adaptive and tv == "t"
    if not math.isfinite(sde.s_of_t(torch.tensor(max(t_start, t_end), dtype=F64)).item()):
        # alpha = 0 at T (flow matching): s = log(sigma/alpha) is +inf there, so the ODE is integrated in t
        if not solver.likelihood or (not solver.adaptive and cfg.grid != "time") or (solver.adaptive and tv == "s"):
            raise SolverError(f"the {sde.name} SDE reaches alpha = 0 at T (log(sigma/alpha) = +inf): it is integrated "
                              f"in t, by dopri5 or a Runge-Kutta solver with --grid time (got {cfg.name}, grid "
                              f"{cfg.grid}, time variable {tv})")
        in_t = True
    F = (ode_func_t if in_t else ode_func)(model, sde, shape)
    y0 = x.reshape(b, m)
    if likelihood is not None:
        if not solver.likelihood:
            raise SolverError(f"the likelihood needs a Runge-Kutta solver, not {cfg.name!r}")
        if likelihood not in ("hutchinson", "exact"):
            raise SolverError(f"likelihood must be 'hutchinson' or 'exact'; got {likelihood!r}")
        idx = sample_index if sample_index is not None else torch.arange(b)
        F = _augment(F, likelihood == "hutchinson", m)
        parts = [y0, torch.zeros(b, 1, dtype=x.dtype, device=x.device)]
        if likelihood == "hutchinson":
            parts.append(rademacher(idx, m, seed).to(dtype=x.dtype, device=x.device))
        y0 = torch.cat(parts, dim=1)
    if in_t:
        u_start, u_end = float(t_start), float(t_end)
    else:
        u_start = sde.s_of_t(torch.tensor(t_start, dtype=F64)).item()
        u_end = sde.s_of_t(torch.tensor(t_end, dtype=F64)).item()
    problem = ODEProblem(as_model(model, sde), sde, F, y0, shape, t_start, t_end, u_start, u_end, in_t, cond)
    ctx = torch.no_grad() if likelihood is not None else torch.inference_mode()
    with ctx:
        res = solver.run(problem, cfg)
    out = PFResult(res.y[:, :m].reshape(b, *shape), res.nfe, res.status)
    if likelihood is not None:
        out.logp = res.y[:, m].to(F64)  # integral of the divergence; completed by the caller
    return out


def encode(model: Model, sde: SDE, x0: torch.Tensor, cfg: SolverConfig = SolverConfig(),
           likelihood: str | None = None, seed: int = 0, sample_index: torch.Tensor | None = None,
           cond: Cond = None) -> PFResult:
    """Map data x0 (at t_eps) to latents z = x(T), through the model's encoder first (the identity for a
    pixel-space model). With ``likelihood``, also log p(x0) and bits/dim (of the encoder's output)."""
    t_eps = sde.check_t_eps(cfg.t_eps)
    model = as_model(model, sde)
    x0 = model.encode_data(x0)
    res = integrate(model, sde, x0, t_eps, sde.T, cfg, likelihood, seed, sample_index, cond)
    if likelihood is not None:
        res.logp = sde.prior_logp(res.x) + res.logp
        res.bpd = -res.logp / (x0[0].numel() * math.log(2))
    return res


def decode(model: Model, sde: SDE, z: torch.Tensor, cfg: SolverConfig = SolverConfig(),
           cond: Cond = None) -> PFResult:
    """Map latents z at T back to data at the same t_eps (no extra denoising step), through the
    model's decoder last (the identity for a pixel-space model)."""
    t_eps = sde.check_t_eps(cfg.t_eps)
    model = as_model(model, sde)
    res = integrate(model, sde, z, sde.T, t_eps, cfg, cond=cond)
    res.x = model.decode_data(res.x)
    return res
