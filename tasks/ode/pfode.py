"""Encode and decode with the probability-flow ODE: x0 at t_eps <-> z = x(T).

``encode`` integrates from ``t_eps`` to ``T`` with ``x(t_eps) = x0``; ``decode`` integrates from ``T``
back to the **same** ``t_eps`` with no extra denoising step, so the round trip can close.
dopri5 and dop853 step in the SDE's own time t by default (``time_var="s"``: in s = log(sigma/alpha),
the default for a discrete diffusers schedule; ``"ddim"`` / ``"ddim_s"``: on the DDIM form, y = x/alpha
against u = sigma/alpha or s = log u); adams4, adams5 and dpm23 step on the DDIM form in s; fixed-step solvers
step on grids in s (see ``pflatents.tasks.ode.sde``). Which solver a job uses by default:
``default_solver``, ``default_tol`` (docs/solver-audit.md).
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
           "SOLVER_NAMES", "ADAPTIVE", "GRIDS", "default_solver", "default_tol", "eps_func", "EPS_SOLVERS"]

F64 = torch.float64
GRIDS = ("logsnr", "edm", "time")
# what the adaptive solver steps in: the SDE's own t, s = log(sigma/alpha), or "auto" = the SDE's choice
# (t for vp/ve/edm; s for a discrete diffusers schedule, whose coefficients are piecewise in t)
# "ddim", "ddim_s": the DDIM form of the ODE, state y = x/alpha (the linear drift vanishes:
# dy/du = eps_hat) against u = sigma/alpha, or against s = log u (dy/ds = u eps_hat)
TIME_VARS = ("auto", "t", "s", "ddim", "ddim_s")
DDIM_VARS = ("ddim", "ddim_s")
EPS_SOLVERS = {"dpm23", "adams4", "adams5"}  # step on eps_hat in s (y = x/alpha), not on dy/dv
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
    # a noise floor that depends on t: ((t_1, level_1), ...) increasing in t, interpolated in log t
    # (constant beyond the ends); replaces ``noise`` when given
    noise_t: tuple[tuple[float, float], ...] = ()
    # latent control's exponent g: the tolerance at t is weighted by (sigma(t)/sigma(T))^g. g = 1 is the
    # Gaussian bound on the flow's amplification; g > 1 spends more of the budget near t_eps, where on
    # some learned models (quantised data: the digits) the latent error is made (docs/solver-audit.md)
    weight_power: float = 1.0

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
        wp = self.weight_power
        if not (isinstance(wp, (int, float)) and not isinstance(wp, bool) and math.isfinite(wp) and 1 <= wp <= 4):
            raise SolverError(f"weight_power must be a number from 1 to 4 (the exponent of latent control's "
                              f"weight); got {wp!r}")
        if wp != 1 and self.control != "latent":
            raise SolverError(f"weight_power {wp!r} applies to latent control only; got control {self.control!r}: "
                              "use control='latent' or leave weight_power at 1")
        if self.noise_t:
            try:
                table = tuple((float(t), float(v)) for t, v in self.noise_t)
            except (TypeError, ValueError):
                raise SolverError(f"noise_t must be pairs (t, level); got {self.noise_t!r}") from None
            ts = [t for t, _ in table]
            if not all(math.isfinite(t) and t > 0 for t in ts) or any(b <= a for a, b in zip(ts, ts[1:])) \
                    or not all(math.isfinite(v) and v >= 0 for _, v in table):
                raise SolverError(f"noise_t must have times > 0, increasing, and finite levels >= 0; got {self.noise_t!r}")
            object.__setattr__(self, "noise_t", table)

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
            if self.noise_t:
                d["noise_t"] = [list(p) for p in self.noise_t]
            if self.weight_power != 1:
                d["weight_power"] = self.weight_power
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


def eps_func(model: Model, sde: SDE, sample_shape: tuple[int, ...], in_u: bool) -> Callable:
    """E(y, v[, cond]) = eps_hat(alpha y, t): the noise prediction on the DDIM state y = x/alpha, at
    v = u = sigma/alpha (``in_u``) or v = s = log u. It is dy/du, the DDIM form of the PF-ODE
    (x_t = alpha (x0 + u eps) makes y = x0_hat + u eps_hat: no linear term)."""
    model = as_model(model, sde)
    eps = getattr(model, "eps", None)

    def E(y: torch.Tensor, v: torch.Tensor, cond: Cond = None) -> torch.Tensor:
        t = sde.t_of_s(torch.log(v) if in_u else v)
        x = (_bcast(sde.alpha(t), y) * y).reshape(y.shape[0], *sample_shape)
        e = eps(x, t, cond) if eps is not None else -model.sigma2_score(x, t, cond) / _bcast(sde.sigma(t), x)
        return e.reshape(y.shape)

    return E


def ode_func_ddim(model: Model, sde: SDE, sample_shape: tuple[int, ...], in_u: bool) -> Callable:
    """dy/du = eps_hat (``in_u``) or dy/ds = u eps_hat, on y = x/alpha (``eps_func``)."""
    E = eps_func(model, sde, sample_shape, in_u)
    if in_u:
        return E

    def G(y: torch.Tensor, s: torch.Tensor, cond: Cond = None) -> torch.Tensor:
        return _bcast(torch.exp(s), y) * S.call(E, y, s, cond)

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


def _latent_weight(sde: SDE, t_start: float, t_end: float, in_t: bool, power: float = 1.0) -> Callable | None:
    """Encode (t increasing): tolerance factor (sigma(t)/sigma(t_end))^power at the solver's time (t or s);
    decode: None.

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
        r = (sde.sigma(t.to(F64)) / sig_end).clamp(max=1.0)
        return r if power == 1 else r ** power

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
    coords: str = "s"  # the solver's time variable: "t", "s" (= log(sigma/alpha)) or "u" (= sigma/alpha)
    ddim: bool = False  # the state is y = x/alpha (the DDIM form) instead of x
    work: torch.dtype | None = None  # the dtype F is evaluated at when y0 is held in float64 (adams4)


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


def _t_of(p: ODEProblem) -> Callable[[torch.Tensor], torch.Tensor]:
    """The SDE's t from the solver's time variable (t, s = log u, or u)."""
    if p.coords == "t":
        return lambda v: v
    if p.coords == "u":
        return lambda v: p.sde.t_of_s(torch.log(v))
    return p.sde.t_of_s


def _noise_at(p: ODEProblem, table: tuple[tuple[float, float], ...]) -> Callable[[torch.Tensor], torch.Tensor]:
    """A per-t noise floor, linear in log t between the table's points, constant beyond them."""
    lt = torch.log(torch.tensor([q[0] for q in table], dtype=F64))
    lv = torch.tensor([q[1] for q in table], dtype=F64)
    t_of = _t_of(p)

    def at(v: torch.Tensor) -> torch.Tensor:
        x = torch.log(t_of(v.to(F64)).cpu()).clamp(float(lt[0]), float(lt[-1]))
        i = torch.clamp(torch.searchsorted(lt, x.contiguous()) - 1, 0, max(len(lt) - 2, 0))
        if len(lt) == 1:
            return lv.expand_as(x).to(v.device)
        w = (x - lt[i]) / (lt[i + 1] - lt[i])
        return (lv[i] + w * (lv[i + 1] - lv[i])).to(v.device)

    return at


def _control(p: ODEProblem, cfg: "SolverConfig") -> S.Control:
    in_t = p.coords == "t"
    weight = None
    if cfg.control == "latent":
        weight = _latent_weight(p.sde, p.t_start, p.t_end, in_t, cfg.weight_power)
        if weight is not None and p.coords == "u":
            w_s = weight
            weight = lambda v: w_s(torch.log(v))  # noqa: E731
    scale = None
    if p.ddim:  # y = x/alpha: errors in x units
        t_of = _t_of(p)
        scale = lambda v: p.sde.alpha(t_of(v.to(F64)))  # noqa: E731
    noise_at = _noise_at(p, cfg.noise_t) if cfg.noise_t else None
    return S.Control(cfg.rtol, cfg.atol, max_steps=cfg.max_steps, weight=weight, noise=cfg.noise, scale=scale,
                     noise_at=noise_at)


def _run_adaptive(p: ODEProblem, cfg: "SolverConfig") -> S.SolveResult:
    return S.solve_adaptive(p.F, p.y0, p.u_start, p.u_end, _control(p, cfg), S.TABLEAUS[cfg.name], p.cond)


# DPM-Solver-3 (singlestep, r1 = 1/3, r2 = 2/3) with DPM-Solver-2 (r1 = 1/3) embedded: what the controller sees
DPM23 = S.Tableau("dpm23", 3, (0.0, 1 / 3, 2 / 3), ((), (1 / 3,), (0.0, 2 / 3)), (0.25, 0.0, 0.75),
                  e=(-0.5, 1.5, -0.75 - 0.25), err_order=3)


def _dpm23_step(F, y, s, h, k0, cond):
    """One DPM-Solver-3 step (Lu et al. 2022) on y = x/alpha in s = log(sigma/alpha), exact for the
    exponential weight: y(s + h) = y + int_0^h e^(s + r) eps(s + r) dr with eps interpolated in r
    through its values at 0, h/3 (2nd order, the embedded solution) and 0, 2h/3 (3rd order).
    ``F`` is ``eps_func`` in s; k0 = eps at (y, s). Returns (y_new, y_new - y_low, None, NFE)."""
    u0 = torch.exp(s)

    def i0(hh):  # int_0^H e^r dr
        return torch.expm1(hh)

    def i1(hh):  # int_0^H e^r r dr = H e^H - (e^H - 1)
        return hh * torch.exp(hh) - torch.expm1(hh)

    def c(v):
        return _bcast(v, y)

    h1, h2 = h / 3, 2 * h / 3
    y1 = y + c(u0 * i0(h1)) * k0
    e1 = S.call(F, y1, s + h1, cond)
    y2 = y + c(u0 * i0(h2)) * k0 + c(u0 * i1(h2) / h1) * (e1 - k0)
    e2 = S.call(F, y2, s + h2, cond)
    base = y + c(u0 * i0(h)) * k0
    y_hi = base + c(u0 * i1(h) / h2) * (e2 - k0)
    y_lo = base + c(u0 * i1(h) / h1) * (e1 - k0)
    return y_hi, y_hi - y_lo, None, 2


def _run_adams(order: int):
    def run(p: ODEProblem, cfg: "SolverConfig") -> S.SolveResult:
        from pflatents.tasks.ode.multistep import solve_exp_adams

        return solve_exp_adams(p.F, p.y0, p.u_start, p.u_end, _control(p, cfg), order, p.cond, p.work)

    return run


def _run_dpm23(p: ODEProblem, cfg: "SolverConfig") -> S.SolveResult:
    return S.solve_adaptive(p.F, p.y0, p.u_start, p.u_end, _control(p, cfg), DPM23, p.cond, step=_dpm23_step)


def _run_dpmpp2m(p: ODEProblem, cfg: "SolverConfig") -> S.SolveResult:
    x = p.y0.reshape(p.y0.shape[0], *p.shape)
    return solve_dpmpp2m(p.model, p.sde, x, _grid(p, cfg), p.cond)


# name -> solver, in the order the CLI lists them
SOLVERS: dict[str, Solver] = {
    "euler": Solver("euler", _run_rk),
    "heun": Solver("heun", _run_rk),
    "rk4": Solver("rk4", _run_rk),
    "dopri5": Solver("dopri5", _run_adaptive, adaptive=True),
    "dop853": Solver("dop853", _run_adaptive, adaptive=True),
    "dpm23": Solver("dpm23", _run_dpm23, adaptive=True, likelihood=False),
    "adams4": Solver("adams4", _run_adams(4), adaptive=True, likelihood=False),
    # order 5 predictor / 6 corrector: more NFE than adams4 at p99 1e-3, fewer at 1e-4 on the learned-model
    # benchmark (benchmarks/README.md, "adams5"); the --latent-tol pilot picks between them per target
    "adams5": Solver("adams5", _run_adams(5), adaptive=True, likelihood=False),
    "dpmpp2m": Solver("dpmpp2m", _run_dpmpp2m, likelihood=False),
}
SOLVER_NAMES = tuple(SOLVERS)
ADAPTIVE = tuple(n for n, v in SOLVERS.items() if v.adaptive)
MULTISTEP = tuple(n for n, v in SOLVERS.items() if not v.likelihood)


def default_solver(exact: bool, sde: SDE) -> str:
    """The default for a job: ``adams4`` for a network (the learned-model benchmark's cheapest at equal
    p99 latent error), ``dopri5`` for an exact score (a GMM: well conditioned, benchmarks/solvers.py's
    default) and for an SDE whose alpha reaches 0 at T (flow matching: no finite s = log(sigma/alpha) there)."""
    if exact or not math.isfinite(sde.s_of_t(torch.tensor(sde.T, dtype=F64)).item()):
        return "dopri5"
    return "adams4"


DEFAULT_TOL = {"adams4": 3e-5, "adams5": 3e-5}  # the others: 1e-6


def default_tol(name: str) -> float:
    """The default rtol = atol of an adaptive solver (benchmarks/README.md, "PF-ODE geometry")."""
    return DEFAULT_TOL.get(name, 1e-6)


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
    in_t = solver.adaptive and tv == "t" and cfg.name not in EPS_SOLVERS  # dpm23 steps in s
    if not math.isfinite(sde.s_of_t(torch.tensor(max(t_start, t_end), dtype=F64)).item()):
        # alpha = 0 at T (flow matching): s = log(sigma/alpha) is +inf there, so the ODE is integrated in t
        if not solver.likelihood or (not solver.adaptive and cfg.grid != "time") or (solver.adaptive and tv == "s"):
            raise SolverError(f"the {sde.name} SDE reaches alpha = 0 at T (log(sigma/alpha) = +inf): it is integrated "
                              f"in t, by dopri5 or a Runge-Kutta solver with --grid time (got {cfg.name}, grid "
                              f"{cfg.grid}, time variable {tv})")
        in_t = True
    ddim = solver.adaptive and not in_t and (tv in DDIM_VARS or cfg.name in EPS_SOLVERS)
    coords = "t" if in_t else ("u" if tv == "ddim" and cfg.name not in EPS_SOLVERS else "s")
    if ddim:
        F = (eps_func(model, sde, shape, coords == "u") if cfg.name in EPS_SOLVERS
             else ode_func_ddim(model, sde, shape, coords == "u"))
    else:
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
        if coords == "u":
            u_start, u_end = math.exp(u_start), math.exp(u_end)
    work = None
    if ddim:  # y = x / alpha
        a0 = sde.alpha(torch.tensor(t_start, dtype=F64)).item()
        if cfg.name in EPS_SOLVERS - {"dpm23"}:  # adams: accumulates the state in float64
            work, y0 = y0.dtype, y0.to(F64) / a0
        else:
            y0 = torch.cat([y0[:, :m] / a0, y0[:, m:]], dim=1) if likelihood is not None else y0 / a0
    problem = ODEProblem(as_model(model, sde), sde, F, y0, shape, t_start, t_end, u_start, u_end, in_t, cond,
                         coords, ddim, work)
    ctx = torch.no_grad() if likelihood is not None else torch.inference_mode()
    with ctx:
        res = solver.run(problem, cfg)
    yend = res.y[:, :m]
    if ddim:
        yend = (yend * sde.alpha(torch.tensor(t_end, dtype=F64)).item()).to(x.dtype)
    out = PFResult(yend.reshape(b, *shape), res.nfe, res.status)
    if likelihood is not None:
        out.logp = res.y[:, m].to(F64)  # integral of the divergence; completed by the caller
        if ddim:  # log det dx_T/dx_0 = log det dy_T/dy_0 + m log(alpha_end / alpha_start)
            out.logp = out.logp + m * (sde.log_alpha(torch.tensor(t_end, dtype=F64))
                                       - sde.log_alpha(torch.tensor(t_start, dtype=F64))).item()
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
