"""Adaptive exponential Adams predictor-corrector for the PF-ODE's DDIM form, with per-sample control.

The problem: ``dy/ds = e^s E(y, s)`` on y = x/alpha in s = log(sigma/alpha), where E is the noise
prediction eps_hat (``pflatents.tasks.ode.pfode.eps_func``). One step from s_n to s_n + h:

- predictor (order q): E interpolated through its last q values (at s_n, s_{n-1}, ...) and
  ``y_p = y_n + int_0^h e^(s_n + r) P(r) dr`` computed exactly for the polynomial (Gauss-Legendre);
- one evaluation E_{n+1} = E(y_p, s_n + h);
- corrector (order q + 1): the same integral through E_{n+1} and the last q values;
- error estimate ``y_c - y_p`` (Milne's device: the predictor's local error), per sample, in x units
  with the latent weight of ``Control``; an accepted step keeps y_c and E_{n+1} (evaluated at y_p:
  predict-evaluate-correct, as UniPC does), so a step costs one evaluation.

The state is accumulated in float64 whatever its dtype (the right-hand side gets it at that dtype):
near t_eps the flow amplifies the state's rounding by up to sigma(T)/sigma(t_eps), which in float32
made p99 latent errors of ~1e-4 on the learned-model benchmark (benchmarks/README.md).

Each sample keeps its own step, history and order (the order ramps up from 1 as history accrues), so
its result does not depend on its batch mates and finished samples drop out. Step ratios are held
within [0.2, 2] (variable-step Adams is stable for moderate ratios).
"""

from __future__ import annotations

import numpy as np
import torch

from pflatents.tasks.core import Cond, take_cond
from pflatents.tasks.ode import solvers as S

__all__ = ["solve_exp_adams", "exp_adams_step"]

F64 = torch.float64
MAX_GROWTH = 2.0  # step ratio limit: variable-step Adams is stable for moderate ratios
_GL_X, _GL_W = np.polynomial.legendre.leggauss(8)  # exact for the polynomial part up to degree 15


def _weights(nodes: torch.Tensor, valid: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """W[b, j] = int_0^h e^r l_j(r) dr: l_j the Lagrange basis on the valid nodes of row b (relative
    times, (B, K)); invalid nodes get weight 0. Gauss-Legendre in r, float64."""
    gx = torch.as_tensor(_GL_X, dtype=F64, device=h.device)
    gw = torch.as_tensor(_GL_W, dtype=F64, device=h.device)
    r = h[:, None] * (gx[None] + 1) / 2  # (B, G)
    k = nodes.shape[1]
    lag = []
    for j in range(k):
        num = torch.ones_like(r)
        for m in range(k):
            if m == j:
                continue
            f = (r - nodes[:, m:m + 1]) / (nodes[:, j:j + 1] - nodes[:, m:m + 1])
            num = num * torch.where(valid[:, m:m + 1], f, torch.ones_like(f))
        lag.append(torch.where(valid[:, j:j + 1], num, torch.zeros_like(num)))
    basis = torch.stack(lag, 1)  # (B, K, G)
    return (basis * (torch.exp(r) * gw[None] * h[:, None] / 2)[:, None]).sum(-1)


def _combine(W: torch.Tensor, E: torch.Tensor, u: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """u * sum_j W_j E_j in y's dtype: (B, K) weights, (B, K, M) values."""
    return u.to(y.dtype)[:, None] * torch.einsum("bk,bkm->bm", W.to(y.dtype), E.to(y.dtype))


def exp_adams_step(E_fn, y: torch.Tensor, s: torch.Tensor, h: torch.Tensor, hist_s: torch.Tensor,
                   hist_e: torch.Tensor, count: torch.Tensor, cond: Cond = None):
    """One predict-evaluate-correct step of size h (signed, (B,)) from (y, s) with the history of E at
    times ``hist_s`` (B, q), latest first, of which the first ``count`` (B,) are valid.

    Returns (y_p, y_c, E_new, W_c - W_p): the predictor (order min(count, q)), the corrector (one
    order higher), E at (y_p, s + h), and the weights of y_c - y_p on (E_new, history) (the noise gain)."""
    q = hist_s.shape[1]
    slots = torch.arange(q + 1, device=y.device)
    u = torch.exp(s)
    rel = hist_s - s[:, None]  # node times relative to s_n
    valid_p = slots[None, :q] < count[:, None]
    W_p = _weights(rel, valid_p, h)
    y_p = y + _combine(W_p, hist_e, u, y)
    e_new = S.call(E_fn, y_p, s + h, cond)
    nodes_c = torch.cat([h[:, None], rel], 1)  # E_{n+1} first, then the history
    valid_c = slots[None, :q + 1] < (count[:, None] + 1)
    W_c = _weights(nodes_c, valid_c, h)
    y_c = y + _combine(W_c, torch.cat([e_new[:, None], hist_e], 1), u, y)
    return y_p, y_c, e_new, W_c - torch.cat([torch.zeros_like(h)[:, None], W_p], 1)


def solve_exp_adams(E_fn, y0: torch.Tensor, s_start: float, s_end: float, ctl: S.Control, order: int = 4,
                    cond: Cond = None, work: torch.dtype | None = None) -> S.SolveResult:
    """Integrate dy/ds = e^s E(y, s) from s_start to s_end (either direction), per-sample adaptive.

    The state is float64 throughout and returned in float64; E is handed it at ``work`` (default: y0's
    dtype)."""
    b, m, dev = y0.shape[0], y0.shape[1], y0.device
    q = int(order)
    direction = 1.0 if s_end >= s_start else -1.0
    work = work or y0.dtype
    if work != F64:  # the state is accumulated in float64, E sees it at the working dtype (module docstring)
        E_in = E_fn

        def E_fn(yy, ss, cc=None):
            return S.call(E_in, yy.to(work), ss, cc)

    y = y0.to(F64)
    s = torch.full((b,), s_start, dtype=F64, device=dev)
    s_end_t = torch.full((b,), s_end, dtype=F64, device=dev)
    hist_e = torch.zeros(b, q, m, dtype=work, device=dev)  # slot 0: the latest
    hist_s = torch.zeros(b, q, dtype=F64, device=dev)
    count = torch.ones(b, dtype=torch.int64, device=dev)
    e0 = S.call(E_fn, y, s, cond)
    hist_e[:, 0], hist_s[:, 0] = e0, s
    nfe = torch.ones(b, dtype=torch.int64, device=dev)

    def G(yy, ss, cc=None):  # dy/ds, for the starting step only
        return torch.exp(ss).to(yy.dtype)[:, None] * S.call(E_fn, yy, ss, cc)

    span = (s_end_t - s).abs()
    # the first step's estimate y_c - y_p is the order-1 predictor's local error, O(h^2): HNW's starting
    # step with iord = 2 (as iord = 5 for DOPRI5's O(h^5) estimate). iord = 1 started ~1e4 times too
    # small under latent control (h 1.6e-9 in s on the digits model) and spent ~24 doublings to recover
    h = S._initial_step(G, y, s, torch.exp(s).to(y.dtype)[:, None] * e0, direction, span, 2, ctl, cond)
    nfe += 1
    steps = torch.zeros(b, dtype=torch.int64, device=dev)
    status = torch.zeros(b, dtype=torch.int8, device=dev)
    bad0 = ~torch.isfinite(e0).all(1)
    status[bad0] = S.NONFINITE
    active = (span > 0) & ~bad0
    err_old = torch.full((b,), 1e-4, dtype=F64, device=dev)
    while True:
        idx = torch.nonzero(active).squeeze(1)
        if idx.numel() == 0:
            break
        ya, sa, ca = y[idx], s[idx], count[idx]
        he, hs = hist_e[idx], hist_s[idx]
        remaining = (s_end_t[idx] - sa).abs()
        last = h[idx] >= remaining * (1 - 1e-12)
        ha = torch.where(last, remaining, h[idx])
        hs_signed = direction * ha
        ua = torch.exp(sa)
        s_new = sa + hs_signed
        y_p, y_c, e_new, dW = exp_adams_step(E_fn, ya, sa, hs_signed, hs, he, ca, take_cond(cond, idx))
        nfe[idx] += 1
        steps[idx] += 1
        err = y_c - y_p
        w = ctl.weight(sa) if ctl.weight is not None else None
        c = ctl.scale(sa) if ctl.scale is not None else None
        noise = ctl.noise_at(sa) if ctl.noise_at is not None else (ctl.noise if ctl.noise > 0 else None)
        floor = None
        if noise is not None:  # the noise of E carried by the estimate: u sum_j |W_c - W_p| |E|
            floor = S.NOISE_K * noise * ua * dW.abs().sum(1) * e_new.to(F64).pow(2).mean(1).sqrt()
            floor = floor * c if c is not None else floor
        en = S._err_norm(err, ya, y_c, ctl, w, floor, c)
        finite = torch.isfinite(en) & torch.isfinite(y_c).all(1) & torch.isfinite(e_new).all(1)
        en = torch.where(finite, en, torch.full_like(en, float("inf")))
        acc = en <= 1.0
        p_eff = torch.minimum(ca, torch.full_like(ca, q)).to(F64)  # the predictor's order
        expo = 1.0 / (p_eff + 1.0)
        h_next = S.next_step(en, err_old[idx], ha, acc, finite, expo, ctl, MAX_GROWTH)
        ia = idx[acc]
        y[ia] = y_c[acc]
        s[ia] = torch.where(last[acc], s_end_t[ia], s_new[acc])
        hist_e[ia] = torch.cat([e_new[acc][:, None], he[acc][:, :-1]], 1)
        hist_s[ia] = torch.cat([s[ia][:, None], hs[acc][:, :-1]], 1)
        count[ia] = torch.clamp(count[ia] + 1, max=q)
        S.settle(idx, acc, last, ha, h_next, en, finite, ctl, err_old, h, active, steps, span, status)
    return S.SolveResult(y, nfe, status, steps)

