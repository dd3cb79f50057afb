#!/usr/bin/env python
"""Solvers built for the PF-ODE's geometry (issue 21, items 2-3): NFE at equal p99 latent error vs torchdiffeq.

On the four learned benchmark models (benchmarks/learned_models.py, float64 reference by our dopri5 at
1e-10, its convergence against 1e-8 shown) and the GMM of benchmarks/solvers.py, every method encodes
the held-out samples on a tolerance ladder; the NFE where the per-sample p99 max-abs latent error
crosses 1e-3 and 1e-4 is interpolated (log-log) on the ladder and divided by torchdiffeq dopri5's
(whole-batch control, in t, ladder 1e-4 .. 1e-10) at the same level.

Methods (all per-sample control with latent-unit weighting unless the label says local):

- ``dopri5 t``: the earlier default for networks (x against t);
- ``dopri5 ddim`` / ``ddim_s``: the DDIM form, y = x/alpha against u = sigma/alpha (dy/du = eps_hat)
  or against s = log u; the error measured in x (latent) units;
- ``dpm23``: DPM-Solver-3 with DPM-Solver-2 embedded (Lu et al. 2022's adaptive pair), exponential
  integration in s on y;
- ``dop853 ...``: Dormand & Prince 8(5,3) in the same coordinates;
- ``adams4``, ``adams5``: the exponential Adams predictor-corrector of order 4 / 5 (``adams3``: the
  order study's, benchmark only);
- ``adams4 wG``, ``adams5 wG``: with latent control's weight exponent G (``SolverConfig.weight_power``);
- ``+floor(t)``: the right-hand side's noise floor measured per t (``rhs_noise_curve``) instead of one
  level for the whole run.

Usage::

    python -m benchmarks geometry --models patches0 --methods "adams4,dopri5 t"      # one model, two methods
    python -m benchmarks geometry --models digits,patches,patches0 --methods "adams4,dopri5 t"
    python -m benchmarks geometry --models gmm,colour --decades --methods "adams4,dopri5 t"

``--offsets K`` runs K half-decade ladders shifted by 1/(2K) decade and adds a table of each method's
crossings over them (median, range, ratio): the p99 of 64 samples is nearly the worst sample's, so one
ladder's crossing moves by ~10 % with where its rungs fall.

Markdown to stdout, progress to stderr. NFE counts are deterministic; no timings are reported.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.cases.learned import nfe_at, run_tdq  # noqa: E402
from benchmarks.common import learned_models as L  # noqa: E402
from pflatents.tasks.ode.pfode import EPS_SOLVERS, SolverConfig, encode  # noqa: E402
from pflatents.tasks.ode.noise import rhs_noise_curve  # noqa: E402


def _register_orders() -> None:
    """adams3 (the order study) as a benchmark-only entry of the solver table (adams5 is the product's).
    Called by ``main`` only, so importing this module leaves the product's table (the pilot's families) as is."""
    from pflatents.tasks.ode import pfode

    if "adams3" not in pfode.SOLVERS:
        pfode.SOLVERS["adams3"] = pfode.Solver("adams3", pfode._run_adams(3), adaptive=True, likelihood=False)
        pfode.EPS_SOLVERS.add("adams3")
        pfode.SOLVER_NAMES = tuple(pfode.SOLVERS)


F64 = torch.float64
DT = {"float32": torch.float32, "float64": torch.float64}
TARGETS = (1e-3, 1e-4)
TDQ_TOLS = [10 ** (-k / 2) for k in range(8, 21)]  # 1e-4 .. 1e-10, half decades
_T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - _T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def ladder(lo: float, hi: float, quick: bool) -> list[float]:
    """Half-decade tolerances from hi down to lo (every decade with --quick)."""
    k0, k1 = round(-2 * math.log10(hi)), round(-2 * math.log10(lo))
    return [10 ** (-k / 2) for k in range(k0, k1 + 1, 2 if quick else 1)]


# "adams4 w1.75": adams4 with latent control's weight exponent 1.75 -> (solver, exponent)
WEIGHT = {f"{name} w{g:g}": (name, float(g))
          for name, powers in (("adams4", (1.25, 1.5, 1.75, 2, 2.5)), ("adams5", (1.25, 1.75))) for g in powers}
# label -> (solver, time_var, control, floor kind, tolerance ladder bounds)
METHODS = {
    "dopri5 t": ("dopri5", "t", "latent", None, (1e-8, 1e-3)),
    "dopri5 t +floor": ("dopri5", "t", "latent", "const", (1e-9, 1e-3)),
    "dopri5 t +floor(t)": ("dopri5", "t", "latent", "curve", (1e-9, 1e-3)),
    "dopri5 s": ("dopri5", "s", "latent", None, (1e-9, 1e-3)),
    "dopri5 ddim": ("dopri5", "ddim", "latent", None, (1e-9, 1e-3)),
    "dopri5 ddim_s": ("dopri5", "ddim_s", "latent", None, (1e-9, 1e-3)),
    "dpm23": ("dpm23", "s", "latent", None, (1e-7, 1e-2)),
    "adams3": ("adams3", "s", "latent", None, (1e-9, 1e-3)),
    "adams4": ("adams4", "s", "latent", None, (1e-9, 1e-3)),
    "adams5": ("adams5", "s", "latent", None, (1e-9, 1e-3)),
    "adams4 +floor(t)": ("adams4", "s", "latent", "curve", (1e-10, 1e-3)),
    **{label: (name, "s", "latent", None, (1e-9, 1e-3)) for label, (name, _) in WEIGHT.items()},
    "dop853 t": ("dop853", "t", "latent", None, (1e-11, 1e-3)),
    "dop853 s": ("dop853", "s", "latent", None, (1e-11, 1e-3)),
    "dop853 ddim": ("dop853", "ddim", "latent", None, (1e-11, 1e-3)),
    "dop853 ddim_s": ("dop853", "ddim_s", "latent", None, (1e-11, 1e-3)),
    "dop853 ddim_s +floor(t)": ("dop853", "ddim_s", "latent", "curve", (1e-11, 1e-3)),
}


def cfg_for(label: str, tol: float, t_eps: float, noise: float, curve: tuple, control: str | None = None) -> SolverConfig:
    name, tv, ctl, floor, _ = METHODS[label]
    kw = {}
    if floor == "const":
        kw["noise"] = noise
    elif floor == "curve":
        kw["noise_t"] = curve
    if label in WEIGHT:
        kw["weight_power"] = WEIGHT[label][1]
    return SolverConfig(name, rtol=tol, atol=tol, t_eps=t_eps, time_var=tv, control=control or ctl,
                        max_steps=20_000, **kw)


FIXED = {  # label -> (step kind, NFE per step): fixed steps uniform in s = log(sigma/alpha), state y = x/alpha
    "fixed dpm3 s": ("dpm3", 3),
    "fixed rk4 ddim_s": ("rk4", 4),
    "fixed dopri5 ddim_s": ("dopri5", 6),
}


def run_fixed(score, sde, x, t_eps: float, label: str, steps: int) -> tuple[torch.Tensor, float]:
    """Encode with a fixed-step method on y = x/alpha, uniform in s (DPM-Solver-fast's grid)."""
    from pflatents.tasks.ode import solvers as S
    from pflatents.tasks.ode.pfode import _dpm23_step, eps_func, make_grid, ode_func_ddim

    kind, per = FIXED[label]
    shape = tuple(x.shape[1:])
    grid = make_grid(sde, t_eps, sde.T, steps, "logsnr")
    a0 = sde.alpha(torch.tensor(t_eps, dtype=F64)).item()
    aT = sde.alpha(torch.tensor(sde.T, dtype=F64)).item()
    y = x.reshape(x.shape[0], -1) / a0
    b = y.shape[0]
    if kind == "dpm3":
        E = eps_func(score, sde, shape, False)
        for s0, s1 in zip(grid[:-1], grid[1:]):
            sv = s0.expand(b)
            y, _, _, _ = _dpm23_step(E, y, sv, (s1 - s0).expand(b), E(y, sv), None)
    else:
        y = S.solve_fixed(ode_func_ddim(score, sde, shape, False), y, grid, S.TABLEAUS[kind]).y
    return (y * aT).reshape(x.shape), float(per * steps)


MAX_NFE = 1500
TOLS: list[float] = []  # --tols: these tolerances instead of each method's ladder (learned models)
OFFSETS = [1]  # --offsets K: K half-decade ladders, shifted by 1/(2K) decade each (learned models)


def ladder_set(lo: float, hi: float, k: int) -> list[tuple[float, int]]:
    """(tolerance, ladder index) of ``k`` half-decade ladders from hi down to lo, ladder j shifted
    j/(2k) decade tighter: loosest first."""
    k0, k1 = round(-2 * math.log10(hi)), round(-2 * math.log10(lo))
    return [(10 ** (-(i + j / k) / 2), j) for i in range(k0, k1 + 1) for j in range(k)]


def scan(run, tols: list[float], stop_below: float, after: int = 2) -> list[dict]:
    """Run a ladder (loosest first); stop ``after`` points after p99 fell below ``stop_below``, or past MAX_NFE."""
    out, below = [], 0
    for tol in tols:
        out.append(run(tol))
        below += out[-1]["p99"] < stop_below
        if below >= after or out[-1]["nfe"] > MAX_NFE:
            break
    return out


def measure(score, sde, x, want, cfg: SolverConfig) -> dict:
    with torch.inference_mode():
        r = encode(score, sde, x, cfg)
    e = L.sample_err(r.x, want)
    e = np.where(r.ok.numpy(), e, np.inf)
    return {"nfe": float(r.nfe.double().mean()), "p50": float(np.median(e)), "p99": float(np.quantile(e, .99)),
            "max": float(e.max()), "failed": int((~r.ok).sum())}


def bench_learned(name: str, labels: list[str], dtypes: list[str], t_eps: float, n: int, quick: bool,
                  tdq: bool) -> list[dict]:
    path, test = L.trained(name, n_test=n, log=log)
    m = L.load(path)
    ref = L.reference(m, test, t_eps, log=log)
    conv = float(ref["conv_enc"].max())
    rows = []
    for dtype in dtypes:
        score = m.scores[dtype]
        x = ref["x0"].to(DT[dtype])
        curve = rhs_noise_curve(score, m.scores["float64"], m.sde, ref["x0"], t_eps, DT[dtype])
        curve_y = rhs_noise_curve(score, m.scores["float64"], m.sde, ref["x0"], t_eps, DT[dtype], ddim=True)
        noise = max(v for _, v in curve) if curve else 0.0
        log(f"{name} {dtype}: noise floor {noise:.1e}, per t {[f'{v:.0e}' for _, v in curve]}, "
            f"eps per t {[f'{v:.0e}' for _, v in curve_y]}")
        todo = list(labels) + (["torchdiffeq dopri5"] if tdq else [])
        for label in todo:
            if label in FIXED:
                def run(steps, label=label):
                    with torch.inference_mode():
                        y, nfe = run_fixed(score, m.sde, x, t_eps, label, int(steps))
                    e = L.sample_err(y, ref["z_ref"])
                    return {"nfe": nfe, "p50": float(np.median(e)), "p99": float(np.quantile(e, .99)),
                            "max": float(e.max()), "failed": 0}
                per = FIXED[label][1]
                tols = [n for n in (8, 11, 16, 23, 32, 45, 64, 90, 128, 180, 256) if n * per <= 1200]
                tols = tols[::2] if quick else tols
            elif label == "torchdiffeq dopri5":
                def run(tol):
                    with torch.inference_mode():
                        y, nfe, bad = run_tdq(score, m.sde, x, tol, t_eps, "encode")
                    e = L.sample_err(y, ref["z_ref"])
                    return {"nfe": nfe, "p50": float(np.median(e)), "p99": float(np.quantile(e, .99)),
                            "max": float(e.max()), "failed": bad}
                tols = TDQ_TOLS[::2] if quick else TDQ_TOLS
            else:
                def run(tol, label=label):
                    cv = curve_y if METHODS[label][1].startswith("ddim") or METHODS[label][0] in EPS_SOLVERS else curve
                    return measure(score, m.sde, x, ref["z_ref"], cfg_for(label, tol, t_eps, noise, cv))
                lo, hi = METHODS[label][4]
                tols = TOLS or ladder(lo, hi, quick)
            k = OFFSETS[0] if label not in FIXED and label != "torchdiffeq dopri5" and not TOLS else 1
            which = {}
            if k > 1:  # K shifted half-decade ladders, run as one finer ladder
                lo, hi = METHODS[label][4]
                which = dict(ladder_set(lo, hi, k))
                tols = list(which)
            pts = scan(lambda tol: {"tol": tol, **run(tol)}, tols, stop_below=min(TARGETS) / 3, after=2 * k)
            for p in pts:
                rows.append({"model": name, "dtype": dtype, "t_eps": t_eps, "method": label, "ref_conv": conv, **p,
                             **({"ladder": which[p["tol"]]} if k > 1 else {})})
            curve_pts = [(p["nfe"], p["p99"]) for p in pts]
            log(f"{name} {dtype} {label}: " + ", ".join(f"{t:.0e}: {fe(nfe_at(curve_pts, t))}" for t in TARGETS)
                + " | " + "; ".join(f"{p['tol']:.0e} {p['nfe']:.0f} {p['p99']:.1e}" for p in pts))
    return rows


def bench_gmm(labels: list[str], n: int, quick: bool, tdq: bool) -> list[dict]:
    from benchmarks.cases import solvers as B

    p = B.make_problem(n, t_eps=1e-4)
    B.build_reference(p, n_check=2)
    rows = []
    x = p.x0.float()
    for label in list(labels) + (["torchdiffeq dopri5"] if tdq else []):
        for control in (("local", "latent") if label != "torchdiffeq dopri5" else ("-",)):
            if label != "torchdiffeq dopri5" and METHODS[label][3]:
                continue  # an exact score has no float32 noise to floor
            if label == "torchdiffeq dopri5":
                def run(tol):
                    with torch.inference_mode():
                        y, nfe, bad = run_tdq(p.model, p.sde, x, tol, 1e-4, "encode")
                    e = B.sample_err(y, p.z_ref).numpy()
                    return {"nfe": nfe, "p50": float(np.median(e)), "p99": float(np.quantile(e, .99)),
                            "max": float(e.max()), "failed": bad}
                tols = TDQ_TOLS[::2] if quick else TDQ_TOLS
            else:
                def run(tol, label=label, control=control):
                    with torch.inference_mode():
                        r = encode(p.model, p.sde, x, cfg_for(label, tol, 1e-4, 0.0, (), control))
                    e = B.sample_err(r.x, p.z_ref).numpy()
                    return {"nfe": float(r.nfe.double().mean()), "p50": float(np.median(e)),
                            "p99": float(np.quantile(e, .99)), "max": float(e.max()), "failed": int((~r.ok).sum())}
                lo, hi = METHODS[label][4]
                tols = ladder(max(lo, 1e-10), hi, quick)
            meth = label if control == "-" else f"{label} ({control})"
            pts = scan(lambda tol: {"tol": tol, **run(tol)}, tols, stop_below=min(TARGETS) / 3)
            for q in pts:
                rows.append({"model": "gmm", "dtype": "float32", "t_eps": 1e-4, "method": meth, "ref_conv": 0.0, **q})
            cp = [(q["nfe"], q["p99"]) for q in pts]
            log(f"gmm {meth}: " + ", ".join(f"{t:.0e}: {fe(nfe_at(cp, t))}" for t in TARGETS))
    return rows


def fe(v) -> str:
    return "-" if v is None else f"{v:.0f}"


def table(rows: list[dict]) -> str:
    """Per model and dtype: NFE at p99 1e-3 / 1e-4 and the ratio to torchdiffeq's."""
    out = ["| model | network | method | NFE at p99 1e-3 | ratio | NFE at p99 1e-4 | ratio | best p99 (NFE) |",
           "|---|---|---|---|---|---|---|---|"]
    for key in dict.fromkeys((r["model"], r["dtype"]) for r in rows):
        sub = [r for r in rows if (r["model"], r["dtype"]) == key]
        base = {}
        tq = [(r["nfe"], r["p99"]) for r in sub if r["method"] == "torchdiffeq dopri5"]
        for t in TARGETS:
            base[t] = nfe_at(tq, t) if tq else None
        for meth in dict.fromkeys(r["method"] for r in sub):
            mr = [r for r in sub if r["method"] == meth]
            pts = [(r["nfe"], r["p99"]) for r in mr]
            best = min(mr, key=lambda r: r["p99"])
            cells = []
            for t in TARGETS:
                v = nfe_at(pts, t)
                ratio = f"{v / base[t]:.2f}" if v is not None and base[t] else "-"
                cells += [fe(v), ratio]
            out.append(f"| {key[0]} | {key[1]} | {meth} | " + " | ".join(cells)
                       + f" | {best['p99']:.1e} ({best['nfe']:.0f}) |")
    return "\n".join(out)


def offsets_table(rows: list[dict]) -> str:
    """--offsets: per method, the NFE at p99 1e-3 / 1e-4 on each shifted ladder: median (min - max),
    and the median's ratio to torchdiffeq's (its own half-decade ladder)."""
    out = ["| model | network | method | ladders | NFE at p99 1e-3: median (min-max) | ratio | "
           "NFE at p99 1e-4: median (min-max) | ratio | ratio per ladder at 1e-4 |", "|---|---|---|---|---|---|---|---|---|"]
    for key in dict.fromkeys((r["model"], r["dtype"]) for r in rows if "ladder" in r):
        sub = [r for r in rows if (r["model"], r["dtype"]) == key]
        tq = [(r["nfe"], r["p99"]) for r in sub if r["method"] == "torchdiffeq dopri5"]
        base = {t: nfe_at(tq, t) if tq else None for t in TARGETS}
        for meth in dict.fromkeys(r["method"] for r in sub if "ladder" in r):
            mr = [r for r in sub if r["method"] == meth]
            k = max(r["ladder"] for r in mr) + 1
            cells, per = [], ""
            for t in TARGETS:
                v = [nfe_at([(r["nfe"], r["p99"]) for r in mr if r["ladder"] == j], t) for j in range(k)]
                got = [x for x in v if x is not None]
                med = float(np.median(got)) if len(got) == k else None
                cells += [f"{fe(med)} ({min(got):.0f}-{max(got):.0f})" if got else "-",
                          f"{med / base[t]:.3f}" if med and base[t] else "-"]
                if t == TARGETS[-1] and base[t]:
                    per = " ".join(f"{x / base[t]:.3f}" if x else "-" for x in v)
            out.append(f"| {key[0]} | {key[1]} | {meth} | {k} | " + " | ".join(cells) + f" | {per or '-'} |")
    return "\n".join(out)


def main(argv: list[str] | None = None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks geometry", description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="digits,patches,patches0,colour,gmm")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--dtypes", default="float32")
    ap.add_argument("--t-eps", type=float, default=1e-4)
    ap.add_argument("--n", type=int, default=64, help="held-out samples per learned model")
    ap.add_argument("--n-gmm", type=int, default=1024)
    ap.add_argument("--decades", dest="quick", action="store_true", help="every other tolerance (decades)")
    ap.add_argument("--no-torchdiffeq", action="store_true")
    ap.add_argument("--json", default=None)
    ap.add_argument("--tols", default="", help="comma-separated tolerances instead of the ladders (learned models)")
    ap.add_argument("--offsets", type=int, default=1,
                    help="K > 1: K half-decade ladders shifted by 1/(2K) decade (learned models, adaptive methods); "
                         "a second table gives each method's crossing as the median over the K ladders")
    a = ap.parse_args(argv)
    if a.offsets < 1 or (a.offsets > 1 and (a.quick or a.tols)):
        ap.error(f"--offsets must be >= 1 and goes without --decades and --tols; got {a.offsets}")
    OFFSETS[0] = a.offsets
    _register_orders()
    TOLS[:] = [float(v) for v in a.tols.split(",") if v]
    torch.set_num_threads(1)
    labels = [v for v in a.methods.split(",") if v]
    rows: list[dict] = []
    for name in a.models.split(","):
        if name == "gmm":
            rows += bench_gmm(labels, a.n_gmm, a.quick, not a.no_torchdiffeq)
        else:
            rows += bench_learned(name, labels, a.dtypes.split(","), a.t_eps, a.n, a.quick, not a.no_torchdiffeq)
        if a.json:
            Path(a.json).write_text(json.dumps(rows, indent=1))
    print(f"# PF-ODE geometry solvers ({time.strftime('%Y-%m-%d')}, torch {torch.__version__}, t_eps {a.t_eps:g})\n")
    print(table(rows))
    if a.offsets > 1:
        print(f"\nCrossings over {a.offsets} shifted ladders (the p99 of 64 samples is nearly the worst sample's, "
              "so one ladder's crossing moves with where its rungs fall):\n")
        print(offsets_table(rows))
    return rows


if __name__ == "__main__":
    main()
