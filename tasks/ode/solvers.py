"""ODE solvers for the PF-ODE: one step signature, one loop per kind, a registry by name.

All solvers integrate ``dy/ds = F(y, s)`` for a flat batch ``y`` of shape (B, M) where every sample
carries its own time ``s`` (float64, shape (B,)). Given a conditioning ``cond`` (one int64 label per row,
``pflatents.tasks.core``), they call ``F(y, s, cond)`` with the labels of exactly the rows they pass. The state keeps the caller's dtype; times and step
sizes stay in float64 and are cast at the state boundary.

- Fixed-step explicit Runge-Kutta (euler, heun, rk4) on a shared grid of s values.
- ``dopri5``: Dormand-Prince 5(4) with a PI step controller and **per-sample** error control and
  step size: each sample accepts, rejects and sizes its steps from its own error alone, so its result
  does not depend on its batch mates, and finished samples drop out of the score evaluations.
- ``dop853``: Dormand & Prince 8(5,3), the same loop with HNW's combined error estimate.
- ``dpmpp2m``: DPM-Solver++(2M) (Lu et al. 2022), a multistep exponential integrator for the
  semi-linear PF-ODE; it needs the data prediction, not F, so its loop lives in ``pflatents.tasks.ode.pfode``.
- ``dpm23`` (pfode) plugs its own step into ``solve_adaptive``; ``adams4`` (``pflatents.tasks.ode.multistep``)
  has its own loop with the same controller and error norm (``_err_norm``, ``Control``).

All are entries of one table with one signature, ``pflatents.tasks.ode.pfode.SOLVERS``
(``run(ODEProblem, SolverConfig) -> SolveResult``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Callable

import torch

from pflatents.tasks.core import Cond, take_cond
from pflatents.tasks.errors import SolverError

__all__ = ["Tableau", "TABLEAUS", "SolveResult", "rk_step", "solve_fixed", "solve_adaptive",
           "OK", "STEP_LIMIT", "NONFINITE", "STATUS_NAMES", "call"]

F64 = torch.float64
ODEFunc = Callable[..., torch.Tensor]  # F(y, s), or F(y, s, cond) when the problem is conditioned

OK, STEP_LIMIT, NONFINITE = 0, 1, 2
STATUS_NAMES = {OK: "ok", STEP_LIMIT: "step_limit", NONFINITE: "nonfinite"}


@dataclass(frozen=True)
class Tableau:
    """Butcher tableau of an explicit RK method; ``e`` = b - b_hat for embedded error estimates."""

    name: str
    order: int
    c: tuple[float, ...]
    a: tuple[tuple[float, ...], ...]  # a[i] has i entries (stage i uses k_0..k_{i-1})
    b: tuple[float, ...]
    e: tuple[float, ...] | None = None
    fsal: bool = False  # last stage evaluates F at the new point (reused as the next k_0)
    e3: tuple[float, ...] | None = None  # DOP853's second (3rd-order) estimate, combined with e (``_err_norm``)
    err_order: int | None = None  # the controller's exponent is 1/err_order (default: order)

    @property
    def stages(self) -> int:
        return len(self.c)


EULER = Tableau("euler", 1, (0.0,), ((),), (1.0,))
HEUN = Tableau("heun", 2, (0.0, 1.0), ((), (1.0,)), (0.5, 0.5))  # EDM's 2nd-order (trapezoidal) step
RK4 = Tableau("rk4", 4, (0.0, 0.5, 0.5, 1.0), ((), (0.5,), (0.0, 0.5), (0.0, 0.0, 1.0)), (1 / 6, 1 / 3, 1 / 3, 1 / 6))
DOPRI5 = Tableau(
    "dopri5", 5,
    c=(0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0),
    a=((),
       (1 / 5,),
       (3 / 40, 9 / 40),
       (44 / 45, -56 / 15, 32 / 9),
       (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
       (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
       (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84)),
    b=(35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0),
    e=(35 / 384 - 5179 / 57600, 0.0, 500 / 1113 - 7571 / 16695, 125 / 192 - 393 / 640,
       -2187 / 6784 + 92097 / 339200, 11 / 84 - 187 / 2100, -1 / 40),
    fsal=True,
)


def _dop853() -> Tableau:
    """Dormand & Prince's DOP853 (Hairer, Norsett & Wanner's code; coefficients as scipy ships them):
    12 stages, order 8, with the 13th evaluation at the new point (first same as last) and the
    combined 5th/3rd-order error estimate of the original code."""
    from scipy.integrate._ivp import dop853_coefficients as d

    n = d.N_STAGES
    a = tuple(tuple(float(v) for v in d.A[i, :i]) for i in range(n)) + (tuple(float(v) for v in d.B),)
    c = tuple(float(v) for v in d.C[:n]) + (1.0,)
    b = tuple(float(v) for v in d.B) + (0.0,)
    return Tableau("dop853", 8, c, a, b, e=tuple(float(v) for v in d.E5), fsal=True,
                   e3=tuple(float(v) for v in d.E3), err_order=8)


class _Tableaus(Mapping):
    """The tableaus by name; a value that is a function (DOP853's) is called on first use and its
    tableau kept (its coefficients come with ``scipy.integrate``, whose import is ~0.2 s of every
    command that never uses it)."""

    def __init__(self, entries: dict):
        self._entries = dict(entries)

    def __getitem__(self, name: str) -> Tableau:
        v = self._entries[name]  # KeyError for an unknown name
        if not isinstance(v, Tableau):
            v = self._entries[name] = v()
        return v

    def __iter__(self):
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


TABLEAUS = _Tableaus({t.name: t for t in (EULER, HEUN, RK4, DOPRI5)} | {"dop853": _dop853})


def __getattr__(name: str):  # DOP853, built on first use like TABLEAUS["dop853"]
    if name == "DOP853":
        return TABLEAUS["dop853"]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass
class SolveResult:
    """Final states, score evaluations per sample, and per-sample status (OK / STEP_LIMIT / NONFINITE)."""

    y: torch.Tensor
    nfe: torch.Tensor
    status: torch.Tensor
    steps: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int64))

    @property
    def ok(self) -> torch.Tensor:
        return self.status == OK


def _col(h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """A float64 per-sample step (B,) as a (B, 1) column in y's dtype."""
    return h.to(dtype=y.dtype).unsqueeze(1)


def call(F: ODEFunc, y: torch.Tensor, s: torch.Tensor, cond: Cond = None) -> torch.Tensor:
    """F(y, s), conditioned on ``cond`` (the labels of y's rows) when there is one."""
    return F(y, s) if cond is None else F(y, s, cond)


def rk_step(F: ODEFunc, y: torch.Tensor, s: torch.Tensor, h: torch.Tensor, tab: Tableau,
            k0: torch.Tensor | None = None, cond: Cond = None
            ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, int]:
    """One explicit RK step of per-sample size h. Returns (y_new, error estimate, last k, NFE spent)."""
    hy = _col(h, y)
    nfe = 0
    if k0 is None:
        k0, nfe = call(F, y, s, cond), 1
    ks = [k0]
    for ci, ai in zip(tab.c[1:], tab.a[1:]):
        yi = y + hy * sum(aij * kj for aij, kj in zip(ai, ks) if aij != 0.0)
        ks.append(call(F, yi, s + ci * h, cond))
        nfe += 1
    y_new = yi if tab.fsal else y + hy * sum(bj * kj for bj, kj in zip(tab.b, ks) if bj != 0.0)
    err = hy * sum(ej * kj for ej, kj in zip(tab.e, ks) if ej != 0.0) if tab.e is not None else None
    if tab.e3 is not None:
        err = (err, hy * sum(ej * kj for ej, kj in zip(tab.e3, ks) if ej != 0.0))
    return y_new, err, ks[-1], nfe


def solve_fixed(F: ODEFunc, y0: torch.Tensor, grid: torch.Tensor, tab: Tableau, cond: Cond = None) -> SolveResult:
    """Integrate along a shared grid of s values (float64, shape (n+1,)) with a fixed-step tableau."""
    b = y0.shape[0]
    y = y0
    status = torch.zeros(b, dtype=torch.int8, device=y0.device)
    nfe = torch.zeros(b, dtype=torch.int64, device=y0.device)
    grid = grid.to(device=y0.device, dtype=F64)
    for s0, s1 in zip(grid[:-1], grid[1:]):
        s = s0.expand(b)
        y, _, _, n = rk_step(F, y, s, (s1 - s0).expand(b), tab, cond=cond)
        nfe += n
    bad = ~torch.isfinite(y).all(dim=1)
    status[bad] = NONFINITE
    steps = torch.full((b,), len(grid) - 1, dtype=torch.int64, device=y0.device)
    return SolveResult(y, nfe, status, steps)


@dataclass(frozen=True)
class Control:
    """Step-size controller settings (Hairer, Norsett & Wanner, DOPRI5 code defaults), plus two extensions.

    - ``weight(s) -> (B,)``: a per-sample factor on the tolerance at the step's start (None: 1). The
      PF-ODE's encode direction amplifies an error made at t by up to sigma(T)/sigma(t); weighting the
      tolerance by sigma(t)/sigma(T) makes it a bound on each step's contribution to the *latent*
      error rather than on the local error (``pflatents.tasks.ode.pfode``).
    - ``noise``: the relative noise level of the right-hand side (RMS of |F_lo - F_hi| / RMS |F_hi|,
      e.g. a float32 network against float64; 0: none). An embedded error estimate carries that
      noise as |h| sum_j |e_j| noise |F|; the controller adds ``NOISE_K`` times it to each sample's
      tolerance, so it never asks for accuracy below what F can deliver: the step size is then set by
      the truncation error alone and the step count stays bounded however small the tolerance.
    """

    rtol: float
    atol: float
    safety: float = 0.9
    beta: float = 0.04  # PI stabilisation exponent
    max_factor: float = 10.0
    min_factor: float = 0.2
    max_steps: int = 10_000
    weight: Callable[[torch.Tensor], torch.Tensor] | None = None
    noise: float = 0.0
    # per-sample factor c(u) (B,) with x = c * state, for a solver stepping in other coordinates than
    # x (e.g. y = x/alpha: c = alpha): errors and tolerances are then measured in x units (None: 1)
    scale: Callable[[torch.Tensor], torch.Tensor] | None = None
    # a noise floor that depends on the time, noise_at(u) -> (B,) (relative noise of F at each sample's
    # time); it replaces the constant ``noise`` when given
    noise_at: Callable[[torch.Tensor], torch.Tensor] | None = None

    def __post_init__(self) -> None:
        for name in ("rtol", "atol"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise SolverError(f"{name} must be a finite number > 0; got {v!r}")
        if not (isinstance(self.max_steps, int) and self.max_steps >= 1):
            raise SolverError(f"max_steps must be an integer >= 1; got {self.max_steps!r}")
        if not (isinstance(self.noise, (int, float)) and math.isfinite(self.noise) and self.noise >= 0):
            raise SolverError(f"noise must be a finite number >= 0; got {self.noise!r}")


NOISE_K = 5.0  # margin on the noise term: with noise alone an error ratio <= 0.2, where the PI controller grows h


def _err_norm(err: torch.Tensor | tuple[torch.Tensor, torch.Tensor], y0: torch.Tensor, y1: torch.Tensor,
              ctl: Control, w: torch.Tensor | None = None, floor: torch.Tensor | None = None,
              c: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample RMS of err / (w (atol + rtol max(|y0|, |y1|)) + floor), float64 (B,).

    ``c`` (B,): the factor from the state to x units (errors and states are compared in x units). A pair
    ``err = (e5, e3)`` is DOP853's combined estimate, |e5|^2 / sqrt(|e5|^2 + 0.01 |e3|^2) (HNW's code)."""
    scale = (ctl.atol + ctl.rtol * torch.maximum(y0.abs(), y1.abs())).to(F64)
    if c is not None:
        scale = scale * c[:, None]
    if w is not None:
        scale = scale * w[:, None]
    if floor is not None:
        scale = scale + floor[:, None]
    if isinstance(err, tuple):
        cc = c[:, None] if c is not None else 1.0
        n5 = (err[0].to(F64) * cc / scale).pow(2).mean(dim=1)
        n3 = (err[1].to(F64) * cc / scale).pow(2).mean(dim=1)
        return n5 / (n5 + 0.01 * n3).sqrt().clamp_min(1e-300)
    if c is not None:
        return (err.to(F64) * c[:, None] / scale).pow(2).mean(dim=1).sqrt()
    return (err.to(F64) / scale).pow(2).mean(dim=1).sqrt()


def _initial_step(F: ODEFunc, y: torch.Tensor, s: torch.Tensor, k0: torch.Tensor, direction: float,
                  span: torch.Tensor, order: int, ctl: Control, cond: Cond = None) -> torch.Tensor:
    """Per-sample starting step (Hairer, Norsett & Wanner, Sec. II.4): one extra F evaluation."""
    scale = (ctl.atol + ctl.rtol * y.abs()).to(F64)
    if ctl.weight is not None:
        scale = scale * ctl.weight(s)[:, None]
    if ctl.scale is not None:  # x = c y: the tolerance in y units is the x tolerance / c
        c0 = ctl.scale(s)[:, None]
        scale = (ctl.atol / c0 + ctl.rtol * y.abs()).to(F64) * (ctl.weight(s)[:, None] if ctl.weight else 1.0)
    d0 = (y / scale).to(F64).pow(2).mean(1).sqrt()
    d1 = (k0 / scale).to(F64).pow(2).mean(1).sqrt()
    h0 = torch.where((d0 < 1e-5) | (d1 < 1e-5), torch.full_like(d0, 1e-6), 0.01 * d0 / d1)
    h0 = torch.minimum(h0, span)
    y1 = y + _col(direction * h0, y) * k0
    k1 = call(F, y1, s + direction * h0, cond)
    d2 = ((k1 - k0) / scale).to(F64).pow(2).mean(1).sqrt() / h0
    dmax = torch.maximum(d1, d2)
    # exponent 1/order as in HNW's HINIT (iord = 5 for DOPRI5); 1/(order+1) gave first steps ~2x too long,
    # whose error (amplified by the flow) dominated the worst latent error (benchmarks/cases/solvers.py)
    h1 = torch.where(dmax <= 1e-15, torch.maximum(torch.full_like(h0, 1e-6), h0 * 1e-3),
                     (0.01 / dmax.clamp_min(1e-300)) ** (1.0 / order))
    h = torch.minimum(torch.minimum(100 * h0, h1), span)
    # a non-finite probe F(y1) says nothing about the scale: start from h0 and let rejections shrink it
    return torch.where(torch.isfinite(h), h, h0)


def solve_adaptive(F: ODEFunc, y0: torch.Tensor, s_start: float, s_end: float, ctl: Control,
                   tab: Tableau = DOPRI5, cond: Cond = None, step: Callable | None = None) -> SolveResult:
    """Embedded RK with per-sample error control, step size, acceptance and termination.

    Only the samples still integrating are passed to F (with their rows of ``cond``), so finished
    samples cost nothing and each sample's trajectory is computed from its own state alone
    (batch-independent).
    """
    b, dev = y0.shape[0], y0.device
    direction = 1.0 if s_end >= s_start else -1.0
    y = y0.clone()
    s = torch.full((b,), s_start, dtype=F64, device=dev)
    s_end_t = torch.full((b,), s_end, dtype=F64, device=dev)
    k0 = call(F, y, s, cond)
    nfe = torch.ones(b, dtype=torch.int64, device=dev)
    span = (s_end_t - s).abs()
    h = _initial_step(F, y, s, k0, direction, span, tab.order, ctl, cond)  # magnitude
    nfe += 1
    err_old = torch.full((b,), 1e-4, dtype=F64, device=dev)
    steps = torch.zeros(b, dtype=torch.int64, device=dev)
    status = torch.zeros(b, dtype=torch.int8, device=dev)
    start_bad = ~torch.isfinite(k0).all(1)  # non-finite at the start: no step can be accepted
    status[start_bad] = NONFINITE
    active = (span > 0) & ~start_bad
    expo = 1.0 / (tab.err_order or tab.order) - 0.75 * ctl.beta  # Hairer: 0.2 - 0.75 beta for order 5
    e1 = sum(abs(e) for e in tab.e)  # noise gain of the embedded error estimate
    while True:
        idx = torch.nonzero(active).squeeze(1)
        if idx.numel() == 0:
            break
        ya, sa, ka = y[idx], s[idx], k0[idx]
        remaining = (s_end_t[idx] - sa).abs()
        last = h[idx] >= remaining * (1 - 1e-12)
        ha = torch.where(last, remaining, h[idx])
        if step is None:
            y_new, err, k_new, n = rk_step(F, ya, sa, direction * ha, tab, ka, take_cond(cond, idx))
        else:  # another one-step method with the same contract (k_new None: not first-same-as-last)
            y_new, err, k_new, n = step(F, ya, sa, direction * ha, ka, take_cond(cond, idx))
        nfe[idx] += n
        steps[idx] += 1
        w = ctl.weight(sa) if ctl.weight is not None else None
        c = ctl.scale(sa) if ctl.scale is not None else None
        if ctl.noise_at is not None:
            floor = NOISE_K * e1 * ctl.noise_at(sa) * ha * ka.to(F64).pow(2).mean(1).sqrt()
            floor = floor * c if c is not None else floor
        else:
            floor = NOISE_K * e1 * ctl.noise * ha * ka.to(F64).pow(2).mean(1).sqrt() if ctl.noise > 0 else None
            floor = floor * c if (c is not None and floor is not None) else floor
        en = _err_norm(err, ya, y_new, ctl, w, floor, c)
        finite = torch.isfinite(en) & torch.isfinite(y_new).all(1)
        en = torch.where(finite, en, torch.full_like(en, float("inf")))
        acc = en <= 1.0
        h_next = next_step(en, err_old[idx], ha, acc, finite, expo, ctl, ctl.max_factor)
        ia = idx[acc]
        y[ia] = y_new[acc]
        s[ia] = torch.where(last[acc], s_end_t[ia], sa[acc] + direction * ha[acc])
        if k_new is not None:
            k0[ia] = k_new[acc]
        else:  # evaluate F at the accepted points that go on (the next step's first stage)
            go = acc & ~last
            ig = idx[go]
            if ig.numel():
                k0[ig] = call(F, y[ig], s[ig], take_cond(cond, ig))
                nfe[ig] += 1
        settle(idx, acc, last, ha, h_next, en, finite, ctl, err_old, h, active, steps, span, status)
    return SolveResult(y, nfe, status, steps)


def next_step(en: torch.Tensor, err_prev: torch.Tensor, ha: torch.Tensor, acc: torch.Tensor, finite: torch.Tensor,
              expo, ctl: Control, max_factor: float) -> torch.Tensor:
    """The next step size: PI controller after an accepted step (growth at most ``max_factor``), pure I
    with no growth after a rejection, ``min_factor`` after a non-finite one. ``expo``: 1/order (a float
    or a per-sample tensor), less the PI term."""
    fac11 = en.clamp_min(1e-300) ** expo
    fac = (fac11 / err_prev ** ctl.beta) / ctl.safety
    grow = 1.0 / fac.clamp(1.0 / max_factor, 1.0 / ctl.min_factor)
    shrink = 1.0 / (fac11 / ctl.safety).clamp(1.0, 1.0 / ctl.min_factor)
    h_next = ha * torch.where(acc, grow, shrink)
    return torch.where(finite, h_next, ha * ctl.min_factor)


def settle(idx, acc, last, ha, h_next, en, finite, ctl: Control, err_old, h, active, steps, span, status) -> None:
    """After a step of the rows ``idx``: the error memory, the next step, and which rows are done,
    over the step limit or stuck (step below 1e-14 of the span: STEP_LIMIT, or NONFINITE if not finite)."""
    ia = idx[acc]
    err_old[ia] = en[acc].clamp_min(1e-4)
    h[idx] = torch.where(acc & last, ha, h_next)
    done = acc & last
    active[idx[done]] = False
    over = ~done & (steps[idx] >= ctl.max_steps)
    tiny = ~done & (h_next <= 1e-14 * span[idx].clamp_min(1e-300))
    status[idx[over | (tiny & finite)]] = STEP_LIMIT
    status[idx[tiny & ~finite]] = NONFINITE
    active[idx[over | tiny]] = False
