"""Where dopri5's worst latent error comes from, and what the time variable costs (benchmarks/README.md, "Solver audit").

    .venv/bin/python -m benchmarks solver_audit [--n 1024] [--vars t,s,sqrt_t,log_t] [--audit-tol 1e-5]

Same problem as the solvers case (benchmarks/common/gmm.py: GMM D = 16, K = 8, VP, t_eps = 1e-5, exact score, float64).

1. Time variables: our per-sample dopri5 on dx/du = dx/dt dt/du for u in {t, s = log(sigma/alpha),
   sqrt(t), log(t)}; tolerances tightened along the half-decade ladder until the worst latent error is
   <= 1e-4; prints the NFE where the error curve crosses 1e-4 (log-log interpolated).
2. Per-step audit in t at --audit-tol: for the worst samples (and a median one), every accepted step's
   local error (against a tol-1e-12 integration of the same step from the same state) and that error
   carried to T (two tight integrations from the step's end, with and without it). Their sum is the
   sample's global error; the table shows which steps make it.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.common import gmm
from benchmarks.common.measure import nfe_at
from benchmarks.common.report import log
from pflatents.tasks.ode import solvers as S

F64 = torch.float64
TARGET = 1e-4  # worst per-sample latent error
LADDER = [1e-3, 3e-4, 1e-4, 3e-5, 1e-5, 3e-6, 1e-6, 3e-7, 1e-7, 3e-8]


def time_variable(sde, name: str):
    """(u_of_t, t_of_u, dt/du) for a time variable name."""
    if name == "t":
        return (lambda t: t), (lambda u: u), (lambda u: torch.ones_like(u))
    if name == "s":
        return sde.s_of_t, sde.t_of_s, (lambda u: 2.0 * sde.sigma(sde.t_of_s(u)) ** 2 / sde.beta(sde.t_of_s(u)))
    if name == "sqrt_t":
        return torch.sqrt, (lambda u: u * u), (lambda u: 2.0 * u)
    if name == "log_t":
        return torch.log, torch.exp, torch.exp
    raise SystemExit(f"unknown time variable {name!r}")


def velocity(p, name: str):
    """G(y, u) = dx/du for the PF-ODE in plain t (VP: dx/dt = -beta/2 (x + score))."""
    _, t_of_u, dtdu = time_variable(p.sde, name)

    def G(y: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        t = t_of_u(u)
        return p.sde.velocity(y, t, p.model(y, t)) * dtdu(u)[:, None]

    return G


def span(p, name: str) -> tuple[float, float]:
    u_of_t = time_variable(p.sde, name)[0]
    return tuple(u_of_t(torch.tensor(v, dtype=F64)).item() for v in (p.t_eps, p.sde.T))


def scan(p, name: str) -> float | None:
    G, (u0, u1) = velocity(p, name), span(p, name)
    pts = []
    with torch.inference_mode():
        for tol in LADDER:
            r = S.solve_adaptive(G, p.x0.clone(), u0, u1, S.Control(tol, tol, max_steps=100_000))
            err = (r.y - p.z_ref).abs().amax(1).max().item()
            pts.append((r.nfe.double().mean().item(), err))
            log(f"  {name} tol {tol:.0e}: NFE {pts[-1][0]:.1f}, worst latent error {err:.1e}")
            if err <= TARGET:
                break
    return nfe_at(pts, TARGET)


def audit(p, tol: float, n_show: int = 3) -> str:
    G, (u0, u1) = velocity(p, "t"), span(p, "t")
    tight = S.Control(1e-12, 1e-12, max_steps=100_000)
    ctl = S.Control(tol, tol)
    lines = []
    with torch.inference_mode():
        err = (S.solve_adaptive(G, p.x0.clone(), u0, u1, ctl).y - p.z_ref).abs().amax(1)
        order = err.argsort(descending=True).tolist()
        for i in order[:n_show] + [order[len(order) // 2]]:
            steps = []
            orig = S.rk_step

            def recording(F, y, s, h, tab, *rest):
                out = orig(F, y, s, h, tab, *rest)
                steps.append((s.item(), (s + h).item(), y.clone(), out[0].clone(), out[1].clone()))
                return out

            S.rk_step = recording
            try:
                r = S.solve_adaptive(G, p.x0[i:i + 1].clone(), u0, u1, ctl)
            finally:
                S.rk_step = orig
            total = (r.y - p.z_ref[i:i + 1]).abs().max().item()
            lines.append(f"\nsample {i}: worst latent error {total:.2e}, NFE {int(r.nfe)}\n\n"
                         "| step t0 -> t1 | error estimate / tolerance | local error | carried to T |\n|---|---|---|---|")
            for a, b, y, yn, e in steps:
                est = S._err_norm(e, y, yn, ctl).item()
                if est > 1.0:
                    continue  # rejected
                exact = S.solve_adaptive(G, y, a, b, tight).y
                with_err = S.solve_adaptive(G, yn, b, u1, tight).y
                without = S.solve_adaptive(G, exact, b, u1, tight).y
                lines.append(f"| {a:.4f} -> {b:.4f} | {est:.2f} | {(yn - exact).abs().max().item():.1e} | "
                             f"{(with_err - without).abs().max().item():.1e} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks solver_audit", description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--vars", default="t,s,sqrt_t,log_t")
    ap.add_argument("--audit-tol", type=float, default=1e-5)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    p = gmm.make_problem(a.n)
    gmm.build_reference(p, n_check=2)
    print(f"## dopri5 (per-sample control) by time variable, {a.n} samples, float64\n")
    print("| time variable | NFE at worst latent error 1e-4 (interp.) |\n|---|---|")
    scans = {}
    for name in a.vars.split(","):
        v = scans[name] = scan(p, name)
        print(f"| {name} | {'-' if v is None else f'{v:.1f}'} |", flush=True)
    print(f"\n## Per-step audit in t at tol {a.audit_tol:g}")
    print(audit(p, a.audit_tol))
    return {"n": a.n, "nfe_at_1e-4": scans, "audit_tol": a.audit_tol}

