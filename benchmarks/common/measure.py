"""Measuring solvers, shared by the solver cases: score evaluations counted, torchdiffeq's dopri5 as the
yardstick, the NFE where an error curve crosses a level, and the number formats of their tables."""

from __future__ import annotations

import math
import time
from typing import Callable

import torch

F64 = torch.float64


class Timer:
    """Wall and process CPU seconds of a with-block (.wall, .cpu)."""

    def __enter__(self) -> "Timer":
        self.w0, self.c0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.wall = time.perf_counter() - self.w0
        self.cpu = time.process_time() - self.c0


class Counted:
    """Score wrapper counting batched calls and per-sample evaluations."""

    def __init__(self, model: Callable) -> None:
        self.model, self.calls, self.evals = model, 0, 0

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.evals += x.shape[0]
        return self.model(x, t)


def sample_err(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Per-sample max-abs error, float64 (B,)."""
    b = ref.shape[0]
    return (x.to(F64).reshape(b, -1) - ref.to(F64).reshape(b, -1)).abs().amax(1)


def velocity_t(model: Callable, sde) -> Callable:
    """PF-ODE in plain t on a batch, t a scalar tensor: f(t, x) = sde.velocity(x, t, score(x, t))."""

    def f(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        tb = t.to(F64).reshape(-1).expand(x.shape[0])
        return sde.velocity(x, tb, model(x, tb))

    return f


def run_tdq(model, sde, x: torch.Tensor, tol: float, t_eps: float, direction: str):
    """torchdiffeq's dopri5 on the whole batch in plain t (one error norm over every value), encode
    (t_eps -> T) or decode (T -> t_eps); returns (x, batched calls = NFE per sample, non-finite samples)."""
    from torchdiffeq import odeint

    m = Counted(model)
    f = velocity_t(m, sde)
    span = torch.tensor([t_eps, sde.T], dtype=F64)
    flat = x.reshape(x.shape[0], -1)
    g = (lambda t, y: f(t, y.reshape(x.shape)).reshape(y.shape))  # noqa: E731
    if direction == "encode":
        y = odeint(g, flat, span, rtol=tol, atol=tol, method="dopri5")[-1]
    else:  # step_t makes it land on t_eps (vanilla odeint steps past it to t < 0)
        y = odeint(g, flat, span.flip(0), rtol=tol, atol=tol, method="dopri5", options=dict(step_t=span[:1]))[-1]
    return y.reshape(x.shape), float(m.calls), int((~torch.isfinite(y).all(1)).sum())


def nfe_at(points: list[tuple[float, float]], target: float) -> float | None:
    """NFE where the error first drops to target, log-log interpolated between the two ladder points
    around it; points are (nfe, error). The first point's NFE if it is already there; None if none is."""
    pts = sorted(points)
    if pts and pts[0][1] <= target:
        return pts[0][0]
    for (n0, e0), (n1, e1) in zip(pts, pts[1:]):
        if e0 > target >= e1:
            w = math.log(e0 / target) / math.log(e0 / e1)
            return n0 * (n1 / n0) ** w
    return None


def fe(v: float | None) -> str:
    return "-" if v is None else f"{v:.1e}"


def ff(v: float | None, fmt: str = ".1f") -> str:
    return "-" if v is None else format(v, fmt)
