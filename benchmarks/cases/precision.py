"""What each network precision costs in latent error, and whether torch.compile pays on this CPU.

    .venv/bin/python -m benchmarks precision [--n 64] [--models digits,colour] [--solvers 'rk4 64,dopri5 5e-7'] [--no-ref] [--compile]

Models: the learned-model benchmark's trained checkpoints (benchmarks/common/learned_models.py: the digits
MLP and the 8x8x3 colour-patch U-Net), loaded through the product's registry with
``load_model(spec, sde, precision=...)``, i.e. the same adapter an extraction uses. Held-out samples
are encoded with rk4 (64 steps) and the default dopri5 at every precision, the ODE state in float32
(and float64 for fp64). Errors are per-sample max-abs latent errors against the float64 reference
(float64 weights, label, preconditioning and state; dopri5 at 1e-12, converged: learned_models.py),
and against the fp64 run of the same solver (the precision's own share). ``tf32`` is the fp32
computation on a CPU (no TF32 there): it is listed to show that.

``--compile``: eager vs ``torch.compile`` forward throughput of both networks at batch 256 and
1024, the compile time, and the latent difference compiled vs eager (rk4, 16 steps).
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch

from benchmarks.common.learned_models import load, reference, sample_err, trained  # noqa: E402

from pflatents.tasks.models.registry import load_model  # noqa: E402
from pflatents.tasks.ode.pfode import SolverConfig, encode  # noqa: E402
from pflatents.tasks.ode.sde import VPSDE  # noqa: E402

SOLVERS = {"rk4 64": SolverConfig("rk4", steps=64), "dopri5 5e-7": SolverConfig("dopri5")}
RUNS = [("fp32", "float32"), ("tf32", "float32"), ("bf16", "float32"), ("fp64", "float32"), ("fp64", "float64")]


def _q(e: np.ndarray) -> str:
    return f"{np.quantile(e, 0.5):.1e} / {np.quantile(e, 0.99):.1e} / {e.max():.1e}"


def precision_table(name: str, n: int, solvers: list[str], with_ref: bool = True) -> list[dict]:
    path, test = trained(name, n_test=n)
    sde = VPSDE()
    x = torch.from_numpy(test)
    if with_ref:
        ref = reference(load(path), test, 1e-5)
        z_ref, conv = ref["z_ref"], f"reference converged to {ref['conv_enc'].max():.1e}"
    else:
        z_ref, conv = None, "no float64 reference (--no-ref)"
    print(f"\n### {name} ({n} held-out samples, t_eps 1e-5; {conv})\n")
    print("| solver | precision | state | mean NFE | err vs f64 ref p50 / p99 / max | precision's own share "
          "p50 / p99 / max | s |")
    print("|---|---|---|---|---|---|---|")
    rec = []
    for sname in solvers:
        cfg, own = SOLVERS[sname], None
        rows = []
        for prec, dtype in reversed(RUNS):  # fp64/float64 first: it is the same-solver baseline
            model = load_model(str(path), sde, precision=prec)
            t0 = time.perf_counter()
            with torch.inference_mode():
                r = encode(model, sde, x.to(getattr(torch, dtype)), cfg)
            dt = time.perf_counter() - t0
            z = r.x.double()
            if own is None:
                own = z
            vs_ref = _q(sample_err(z, z_ref)) if z_ref is not None else "-"
            rows.append(f"| {sname} | {prec} | {dtype} | {r.nfe.double().mean():.0f} | {vs_ref} | "
                        f"{_q(sample_err(z, own))} | {dt:.1f} |")
            rec.append(dict(model=name, solver=sname, precision=prec, state=dtype, nfe=float(r.nfe.double().mean()),
                            vs_ref=vs_ref, own_share=_q(sample_err(z, own)), seconds=dt))
        print("\n".join(reversed(rows)), flush=True)
    return rec


def _bench(fn, reps: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def compile_table(names: list[str]) -> None:
    print("\n### torch.compile on this CPU (forward pass, float32)\n")
    print("| model | batch | eager ms | compiled ms | speed-up | compile s | latent diff compiled vs eager (rk4 16) |")
    print("|---|---|---|---|---|---|---|")
    sde = VPSDE()
    for name in names:
        path, test = trained(name, n_test=32)
        eager = load_model(str(path), sde, precision="fp32", compile="off")
        comp = load_model(str(path), sde, precision="fp32", compile="on")
        shape = test.shape[1:]
        t0 = time.perf_counter()
        with torch.inference_mode():
            comp(torch.randn(256, *shape, dtype=torch.float64), torch.full((256,), 0.5, dtype=torch.float64))
        t_compile = time.perf_counter() - t0
        with torch.inference_mode():
            cfg = SolverConfig("rk4", steps=16)
            x = torch.from_numpy(test)
            diff = (encode(comp, sde, x, cfg).x.double() - encode(eager, sde, x, cfg).x.double()).abs().max().item()
        for b in (256, 1024):
            xb = torch.randn(b, *shape)
            tb = torch.full((b,), 0.5, dtype=torch.float64)
            with torch.inference_mode():
                te = _bench(lambda: eager(xb, tb), 20)
                tc = _bench(lambda: comp(xb, tb), 20)
            print(f"| {name} | {b} | {te * 1e3:.2f} | {tc * 1e3:.2f} | {te / tc:.2f}x | {t_compile:.1f} | {diff:.1e} |",
                  flush=True)
        print(f"compile status: {comp.net.compile_status}", file=sys.stderr)


def main(argv: list[str] | None = None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks precision")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--models", default="digits,colour")
    ap.add_argument("--solvers", default=",".join(SOLVERS), help=f"comma-separated, of: {', '.join(SOLVERS)}")
    ap.add_argument("--compile", action="store_true", help="also measure torch.compile on this CPU")
    ap.add_argument("--no-ref", action="store_true", help="skip the float64 reference (the precisions' own share only)")
    a = ap.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {time.strftime('%Y-%m-%d')}")
    names = a.models.split(",")
    rows = []
    for name in names:
        rows += precision_table(name, a.n, a.solvers.split(","), with_ref=not a.no_ref)
    if a.compile:
        compile_table(names)
    return rows

