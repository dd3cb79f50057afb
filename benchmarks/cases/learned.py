"""Solver benchmark on learned models: per-sample latent error against a float64 reference vs NFE.

Models (benchmarks/common/learned_models.py): MLPs trained with the project's training code on digits, on
8x8 grey patches of scikit-learn's sample photos and on the same patches with their mean removed
(a degenerate direction), and a small U-Net on 8x8x3 colour patches; VP SDE. Held-out samples are
encoded (and the reference latents decoded) by every method, with the network evaluated in float32
(float32 state) and in float64 (float64 state), at two t_eps. Errors are per-sample max-abs against
the float64 reference; the table gives p50 / p99 / max over samples and the mean NFE per sample.

Methods: our dopri5 (per-sample control, in t) on a tolerance ladder, with and without the noise
floor; rk4 and heun on the logsnr / edm / time grids; dpmpp2m (logsnr grid); torchdiffeq dopri5
(whole-batch control, in t); torchode dopri5 (per-sample control, in t) when installed.

Usage::

    python -m benchmarks learned                       # all models, both t_eps, both dtypes
    python -m benchmarks learned --models patches --t-eps 1e-5 --half-ladder
    python -m benchmarks learned --json out.json       # every row as JSON

Markdown to stdout, progress to stderr.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.common import learned_models as L  # noqa: E402
from benchmarks.common.measure import Counted, nfe_at, run_tdq, velocity_t  # noqa: E402
from benchmarks.common.report import log  # noqa: E402
from pflatents.tasks.ode.pfode import SolverConfig, decode, encode  # noqa: E402
from pflatents.tasks.ode.pilot import rhs_noise  # noqa: E402

F64 = torch.float64
DT = {"float32": torch.float32, "float64": torch.float64}
TOLS = [1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 3e-5, 1e-5, 3e-6, 1e-6, 5e-7, 1e-7]
STEPS = {"rk4": [8, 16, 32, 64, 128], "heun": [16, 32, 64, 128, 256], "dpmpp2m": [16, 32, 64, 128, 256, 512]}
TARGETS = (1e-2, 1e-3, 1e-4)


def run_ours(model, sde, x, cfg: SolverConfig, direction: str):
    fn = encode if direction == "encode" else decode
    r = fn(model, sde, x, cfg)
    return r.x, float(r.nfe.double().mean()), int((~r.ok).sum())


def run_torchode(model, sde, x, tol: float, t_eps: float, direction: str):
    import torchode as to

    m = Counted(model)
    f = velocity_t(m, sde)
    b = x.shape[0]
    g = (lambda t, y: f(t, y.reshape(x.shape)).reshape(y.shape))  # noqa: E731
    term = to.ODETerm(g)
    solver = to.AutoDiffAdjoint(to.Dopri5(term=term), to.IntegralController(atol=tol, rtol=tol, term=term),
                                max_steps=20_000)
    a, z = (t_eps, sde.T) if direction == "encode" else (sde.T, t_eps)
    ivp = to.InitialValueProblem(y0=x.reshape(b, -1), t_start=torch.full((b,), a, dtype=F64),
                                 t_end=torch.full((b,), z, dtype=F64))
    sol = solver.solve(ivp)
    y = sol.ys[:, -1]
    bad = int((sol.status != 0).sum())
    return y.reshape(x.shape), float(sol.stats["n_f_evals"].double().mean()), bad


def methods(t_eps: float, quick: bool, noise: float) -> list[tuple[str, str, object]]:
    """(method, setting label, runner(model, sde, x, direction)) for every setting."""
    out = []
    tols = TOLS[::2] if quick else TOLS
    for label, kw in (("ours dopri5", {"control": "local"}), ("ours dopri5 latent", {"control": "latent"}),
                      ("ours dopri5 latent+floor", {"control": "latent", "noise": noise})):
        if label.endswith("floor") and not noise:
            continue
        for tol in tols:
            cfg = SolverConfig("dopri5", rtol=tol, atol=tol, t_eps=t_eps, **kw)
            out.append((label, f"tol {tol:.0e}", lambda m, s, x, d, cfg=cfg: run_ours(m, s, x, cfg, d)))
    for name in ("rk4", "heun", "dpmpp2m"):
        for grid in (("logsnr", "edm", "time") if name != "dpmpp2m" else ("logsnr",)):
            for n in STEPS[name][::2] if quick else STEPS[name]:
                cfg = SolverConfig(name, steps=n, grid=grid, t_eps=t_eps)
                out.append((f"{name} {grid}", f"{n} steps", lambda m, s, x, d, cfg=cfg: run_ours(m, s, x, cfg, d)))
    for tol in tols:
        out.append(("torchdiffeq dopri5", f"tol {tol:.0e}",
                    lambda m, s, x, d, tol=tol: run_tdq(m, s, x, tol, t_eps, d)))
    try:
        import torchode  # noqa: F401

        for tol in tols:
            out.append(("torchode dopri5", f"tol {tol:.0e}",
                        lambda m, s, x, d, tol=tol: run_torchode(m, s, x, tol, t_eps, d)))
    except ImportError:
        log("torchode not installed: skipped")
    return out


def pct(e: np.ndarray) -> tuple[float, float, float]:
    return float(np.median(e)), float(np.quantile(e, 0.99)), float(e.max())


def bench_model(name: str, t_eps_list, dtypes, quick: bool, n: int, keep: set | None = None) -> list[dict]:
    path, test = L.trained(name, n_test=n, log=log)
    m = L.load(path)
    rows = []
    for t_eps in t_eps_list:
        ref = L.reference(m, test, t_eps, log=log)
        floor = max(float(ref["conv_enc"].max()), 1e-300)
        for dtype in dtypes:
            score = m.scores[dtype]
            noise = rhs_noise(score, m.scores["float64"], m.sde, ref["x0"], t_eps, DT[dtype])
            log(f"{name} t_eps {t_eps:g} {dtype}: right-hand side noise {noise:.1e}")
            for meth, setting, run in methods(t_eps, quick, noise):
                if keep and meth not in keep:
                    continue
                for direction in ("encode", "decode"):
                    x = (ref["x0"] if direction == "encode" else ref["z_ref"]).to(DT[dtype])
                    want = ref["z_ref"] if direction == "encode" else ref["x_ref"]
                    t0 = time.perf_counter()
                    with torch.inference_mode():
                        y, nfe, bad = run(score, m.sde, x, direction)
                    p50, p99, mx = pct(L.sample_err(y, want))
                    rows.append(dict(model=name, t_eps=t_eps, dtype=dtype, direction=direction, method=meth, noise=noise,
                                     setting=setting, nfe=nfe, p50=p50, p99=p99, max=mx, failed=bad,
                                     wall=time.perf_counter() - t0, ref_conv=floor))
                log(f"{name} t_eps {t_eps:g} {dtype} {meth} {setting}: enc NFE {rows[-2]['nfe']:.0f} "
                    f"p99 {rows[-2]['p99']:.1e} | dec NFE {rows[-1]['nfe']:.0f} p99 {rows[-1]['p99']:.1e}")
            # the time label rounded to float32 before the embedding (the behaviour before the float64 path)
            if dtype == "float32":
                cfg = SolverConfig("dopri5", rtol=5e-7, atol=5e-7, t_eps=t_eps, control="local")  # the old default
                with torch.inference_mode():
                    y, nfe, bad = run_ours(m.rounded_label, m.sde, ref["x0"].float(), cfg, "encode")
                p50, p99, mx = pct(L.sample_err(y, ref["z_ref"]))
                rows.append(dict(model=name, t_eps=t_eps, dtype=dtype, direction="encode", noise=noise,
                                 method="ours dopri5, label rounded to float32", setting="tol 5e-07", nfe=nfe,
                                 p50=p50, p99=p99, max=mx, failed=bad, wall=0.0, ref_conv=floor))
    return rows


def tables(rows: list[dict]) -> str:
    out = []
    keys = sorted({(r["model"], r["t_eps"], r["dtype"], r["direction"]) for r in rows},
                  key=lambda k: (k[0], -k[1], k[2], k[3]))
    for key in keys:
        sub = [r for r in rows if (r["model"], r["t_eps"], r["dtype"], r["direction"]) == key]
        conv = sub[0]["ref_conv"]
        out.append(f"\n### {key[0]}, t_eps {key[1]:g}, network {key[2]}, {key[3]} "
                   f"(reference converged to {conv:.1e})\n")
        out.append("| method | NFE at p99 " + " | NFE at p99 ".join(f"{t:.0e}" for t in TARGETS)
                   + " | best p99 (NFE) | setting: NFE p50/p99/max ... |")
        out.append("|---" * (3 + len(TARGETS)) + "|")
        for meth in dict.fromkeys(r["method"] for r in sub):
            mr = [r for r in sub if r["method"] == meth]
            pts = [(r["nfe"], r["p99"]) for r in mr]
            best = min(mr, key=lambda r: r["p99"])
            cells = [f"{nfe_at(pts, t):.0f}" if nfe_at(pts, t) is not None else "-" for t in TARGETS]
            detail = "; ".join(f"{r['setting']}: {r['nfe']:.0f} {r['p50']:.0e}/{r['p99']:.0e}/{r['max']:.0e}"
                               + (f" ({r['failed']} failed)" if r["failed"] else "") for r in mr)
            out.append(f"| {meth} | " + " | ".join(cells) + f" | {best['p99']:.1e} ({best['nfe']:.0f}) | {detail} |")
    return "\n".join(out)


def main(argv: list[str] | None = None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks learned", description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="digits,patches,patches0,colour")
    ap.add_argument("--t-eps", default="1e-5,1e-3")
    ap.add_argument("--dtypes", default="float32,float64")
    ap.add_argument("--n", type=int, default=64, help="held-out samples per model")
    ap.add_argument("--half-ladder", dest="quick", action="store_true", help="every other setting")
    ap.add_argument("--methods", default=None, help="comma-separated method names to keep (default: all)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    torch.set_num_threads(2)
    rows = []
    for name in a.models.split(","):
        keep = set(a.methods.split(",")) if a.methods else None
        rows += bench_model(name, [float(v) for v in a.t_eps.split(",")], a.dtypes.split(","), a.quick, a.n, keep)
        if a.json:
            Path(a.json).write_text(json.dumps(rows, indent=1))
    print(f"# Learned-model solver benchmark ({time.strftime('%Y-%m-%d')}, torch {torch.__version__})")
    print(tables(rows))
    return rows

