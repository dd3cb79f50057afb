"""What t_eps costs and buys on learned models: conditioning of the encode map, and the default solver's error.

For each model (benchmarks/common/learned_models.py) and t_eps:

- sigma(t_eps) against half the data's quantisation step (8-bit images: 1/255 in [-1, 1] units;
  digits: 1/16): below it the diffused density still separates every quantisation level;
- conditioning: the encode map's gain ||z(x0 + d u) - z(x0)|| / d along a random unit direction u
  (d = 1e-5, float64 network and state, dopri5 latent control at tol 1e-9), p50 and max over samples,
  and the bound sigma(T)/sigma(t_eps) that sharp (quantised, degenerate) directions reach;
- the default solver (dopri5, latent control, tol 1e-6) with a float32 network: per-sample latent
  error p50 / p99 / max against the float64 reference, and mean NFE.

Usage: ``python -m benchmarks learned_teps [--models digits,patches,patches0] [--t-eps 1e-5,1e-4,1e-3]``
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.common import learned_models as L  # noqa: E402
from pflatents.tasks.ode.pfode import SolverConfig, encode  # noqa: E402

F64 = torch.float64
HALF_STEP = {"digits": 1 / 16, "patches": 1 / 255, "patches0": 1 / 255, "colour": 1 / 255}
_T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - _T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def gain(m, x0: torch.Tensor, t_eps: float, n: int = 16, d: float = 1e-5) -> tuple[float, float]:
    x = x0[:n].to(F64)
    u = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=F64)
    u = u / u.reshape(n, -1).norm(dim=1).reshape(-1, *([1] * (x.ndim - 1)))
    cfg = SolverConfig("dopri5", rtol=1e-9, atol=1e-9, t_eps=t_eps, control="latent", max_steps=20_000)
    with torch.inference_mode():
        z0 = encode(m.scores["float64"], m.sde, x, cfg).x
        z1 = encode(m.scores["float64"], m.sde, x + d * u, cfg).x
    g = ((z1 - z0).reshape(n, -1).norm(dim=1) / d).numpy()
    return float(np.median(g)), float(g.max())


def main(argv: list[str] | None = None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks learned_teps", description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="digits,patches,patches0")
    ap.add_argument("--t-eps", default="1e-5,1e-4,1e-3")
    ap.add_argument("--tol", type=float, default=1e-6)
    ap.add_argument("--n", type=int, default=64, help="held-out samples per model")
    a = ap.parse_args(argv)
    torch.set_num_threads(2)
    print("| model | t_eps | sigma(t_eps) | half quantisation step | gain p50 / max (random dir.) | "
          "bound sigma(T)/sigma(t_eps) | default solver float32: NFE | p50 / p99 / max latent error | "
          "reference converged to |")
    print("|---|---|---|---|---|---|---|---|---|")
    rows = []
    for name in a.models.split(","):
        path, test = L.trained(name, n_test=a.n, log=log)
        m = L.load(path)
        for t_eps in [float(v) for v in a.t_eps.split(",")]:
            ref = L.reference(m, test, t_eps, log=log)
            sig = float(m.sde.sigma(torch.tensor(t_eps, dtype=F64)))
            sig_t = float(m.sde.sigma(torch.tensor(m.sde.T, dtype=F64)))
            g50, gmax = gain(m, ref["x0"], t_eps)
            cfg = SolverConfig("dopri5", rtol=a.tol, atol=a.tol, t_eps=t_eps, control="latent")
            with torch.inference_mode():
                r = encode(m.scores["float32"], m.sde, ref["x0"].float(), cfg)
            e = L.sample_err(r.x, ref["z_ref"])
            log(f"{name} t_eps {t_eps:g}: gain {g50:.0f}/{gmax:.0f}, NFE {float(r.nfe.double().mean()):.0f}, "
                f"p99 {np.quantile(e, .99):.1e}")
            print(f"| {name} | {t_eps:g} | {sig:.2g} | {HALF_STEP[name] :.2g} | {g50:.0f} / {gmax:.0f} | "
                  f"{sig_t / sig:.0f} | {float(r.nfe.double().mean()):.0f} | "
                  f"{np.median(e):.1e} / {np.quantile(e, .99):.1e} / {e.max():.1e} | "
                  f"{float(ref['conv_enc'].max()):.1e} |", flush=True)
            rows.append(dict(model=name, t_eps=t_eps, sigma_t_eps=sig, half_step=HALF_STEP[name], gain_p50=g50,
                             gain_max=gmax, bound=sig_t / sig, nfe=float(r.nfe.double().mean()),
                             p50=float(np.median(e)), p99=float(np.quantile(e, .99)), max=float(e.max()),
                             ref_conv=float(ref["conv_enc"].max())))
    return rows

