"""The GMM benchmark problem (benchmarks/common/gmm.py: D = 16, K = 8, VP, exact score) under the old and new
extract defaults, and our dopri5 with local vs latent-unit control on a tolerance ladder.

Reference: our dopri5 in float64 at tol 1e-10 (gmm.build_reference, checked against scipy DOP853).
Errors are per-sample max-abs latent errors (p50 / p99 / max over samples), float32 state.

Usage: ``python -m benchmarks gmm_defaults [--n 1024]``
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.common import gmm  # noqa: E402
from benchmarks.common.measure import sample_err  # noqa: E402
from pflatents.tasks.ode.pfode import SolverConfig, encode  # noqa: E402


def row(p, cfg: SolverConfig, label: str, rows: list[dict]) -> str:
    with torch.inference_mode():
        r = encode(p.model, p.sde, p.x0.float(), cfg)
    e = sample_err(r.x, p.z_ref).numpy()
    rows.append(dict(setting=label, t_eps=cfg.t_eps, nfe_mean=float(r.nfe.double().mean()), nfe_max=int(r.nfe.max()),
                     p50=float(np.median(e)), p99=float(np.quantile(e, .99)), max=float(e.max())))
    return (f"| {label} | {cfg.t_eps:g} | {float(r.nfe.double().mean()):.1f} | {int(r.nfe.max())} | "
            f"{np.median(e):.1e} / {np.quantile(e, .99):.1e} / {e.max():.1e} |")


def main(argv: list[str] | None = None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks gmm_defaults", description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1024)
    a = ap.parse_args(argv)
    torch.set_num_threads(2)
    print("| setting | t_eps | NFE mean | NFE max | latent error p50 / p99 / max |")
    print("|---|---|---|---|---|")
    rows: list[dict] = []
    for t_eps in (1e-5, 1e-4):
        p = gmm.make_problem(a.n, t_eps=t_eps)
        gmm.build_reference(p, n_check=2)
        if t_eps == 1e-5:
            print(row(p, SolverConfig("dopri5", rtol=5e-7, atol=5e-7, t_eps=t_eps, time_var="t", control="local"),
                      "old default: dopri5 local, tol 5e-7", rows), flush=True)
        for tol in (1e-5, 1e-6, 1e-7):
            for control in ("local", "latent"):
                label = f"dopri5 {control}, tol {tol:g}" + (" (new default)" if (tol, control, t_eps) == (1e-6, "latent", 1e-4) else "")
                print(row(p, SolverConfig("dopri5", rtol=tol, atol=tol, t_eps=t_eps, time_var="t", control=control),
                          label, rows), flush=True)
    return {"n": a.n, "rows": rows}

