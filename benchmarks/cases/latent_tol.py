"""--latent-tol on learned models: the pilot's choice, its NFE and delivered p99 against a float64
reference, and torchdiffeq dopri5's NFE at the same p99.

For each learned benchmark model (benchmarks/common/learned_models.py: trained and cached under
benchmarks/out/learned) and each target E, the pilot of ``extract --latent-tol E`` runs as the product
runs it (``pflatents.tasks.ode.pilot.latent_pilot`` on the model loaded by the product at fp32 and
fp64; fit and held-out subsets drawn from the model's training data, 128 + 128 samples). Its choice
then encodes the model's held-out test samples (64, never seen by the pilot nor the training) with the
float32 network and state; the error is per-sample max-abs against the float64 reference of
learned_models.py (float64 network, dopri5 1e-10; independent of the product's pilot reference).
torchdiffeq's dopri5 encodes the same samples on a tolerance ladder (quarter decades); its NFE at the
delivered p99 is interpolated log-log. NFE counts are deterministic; the pilot's seconds are not (a
busy 2-core VM).

Usage::

    python -m benchmarks latent_tol                                   # 4 models x E in {1e-3, 1e-4}
    python -m benchmarks latent_tol --models digits --targets 1e-3    # one row
    python -m benchmarks latent_tol --gmm                             # also the GMM of the solvers case
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.common import learned_models as L  # noqa: E402
from benchmarks.common.report import log  # noqa: E402
from pflatents.tasks.data.sources import ArraySource  # noqa: E402
from pflatents.tasks.models.registry import load_model  # noqa: E402
from pflatents.tasks.ode.pfode import SolverConfig, default_solver, default_tol, encode  # noqa: E402
from pflatents.tasks.ode.pilot import describe, latent_pilot, pilot_subsets, setting_text  # noqa: E402

F64 = torch.float64
T_EPS = 1e-4
TDQ_TOLS = [10 ** (-q / 4) for q in range(8, 41)]  # 1e-2 .. 1e-10, quarter decades


def tdq_curve(score, sde, x: torch.Tensor, z_ref: torch.Tensor, stop_p99: float) -> list[tuple[float, float]]:
    """(NFE per sample, p99) of torchdiffeq dopri5 (batch control, plain t) down the tolerance ladder,
    until its p99 is below ``stop_p99`` / 3."""
    from benchmarks.common.measure import run_tdq

    pts = []
    for tol in TDQ_TOLS:
        with torch.inference_mode():
            y, nfe, bad = run_tdq(score, sde, x, tol, T_EPS, "encode")
        p99 = float(np.quantile(L.sample_err(y, z_ref), 0.99)) if not bad else math.inf
        pts.append((nfe, p99))
        log(f"    torchdiffeq tol {tol:.1e}: NFE {nfe:.0f} p99 {p99:.1e}")
        if p99 < stop_p99 / 3:
            break
    return pts


def nfe_at(points: list[tuple[float, float]], target: float) -> float | None:
    """NFE where p99 first falls to ``target`` along the ladder (log-log interpolation)."""
    for (n0, e0), (n1, e1) in zip(points, points[1:]):
        if e0 <= target:
            return n0
        if e0 > target >= e1:
            w = math.log(e0 / target) / math.log(e0 / e1)
            return n0 * (n1 / n0) ** w
    return points[0][0] if points and points[0][1] <= target else None


def bench(name: str, targets: list[float], n_eval: int) -> list[dict]:
    path, test = L.trained(name, n_test=n_eval, log=log)
    arch, params, steps, n_train = L.SPECS[name]
    train, _ = L.dataset(name, n_train or 0, n_eval)
    m = L.load(path)
    ref = L.reference(m, test, T_EPS, log=log)
    sde = m.sde
    work = load_model(str(path), sde, precision="fp32")
    hi = load_model(str(path), sde, precision="fp64")
    fit, held = pilot_subsets(ArraySource(f"bench:{name}", train))
    # the placeholder extract pins for a network before its pilot runs (tests/test_geometry_solvers.py):
    # the default solver first in the pilot's search, every adaptive family in its time variable
    name0 = default_solver(False, sde)
    base = SolverConfig(name0, rtol=default_tol(name0), atol=default_tol(name0), t_eps=T_EPS, time_var="s",
                        control="latent")
    x = ref["x0"].to(torch.float32)
    rows, tdq = [], None
    for target in targets:
        t0 = time.perf_counter()
        choice, rec = latent_pilot(work, hi, sde, fit, held, base, "float32", target,
                                   progress=lambda d, n, w: log(f"  {name} E {target:g} pilot {d}/{n} {w}"))
        wall = time.perf_counter() - t0
        log(f"  {name} E {target:g}: {describe(rec)} ({wall:.0f} s)")
        with torch.inference_mode():
            r = encode(work, sde, x, choice)
        err = L.sample_err(r.x, ref["z_ref"])
        p99, nfe = float(np.quantile(err, 0.99)), float(r.nfe.double().mean())
        if tdq is None or min(p for _, p in tdq) > p99 / 3:
            tdq = tdq_curve(m.scores["float32"], sde, x, ref["z_ref"], p99)
        t_nfe = nfe_at(tdq, p99)
        chosen = next(rw for rw in rec["curve"] if rw.get("chosen"))
        rows.append(dict(model=name, target=target, choice=choice.to_dict(), family=chosen["family"], nfe=nfe,
                         p50=float(np.median(err)), p99=p99, max=float(err.max()), failed=int((~r.ok).sum()),
                         pilot_fit_p99=chosen["fit"]["p99"], pilot_held_p99=chosen["held"]["p99"],
                         stepped_up=rec["stepped_up"], settings=len(rec["curve"]), pilot_s=wall,
                         tdq_nfe=t_nfe, ratio=None if not t_nfe else nfe / t_nfe, ref_conv=float(ref["conv_enc"].max()),
                         met=rec["met"]))
        log(f"  {name} E {target:g}: delivered p99 {p99:.2e} at {nfe:.0f} NFE; torchdiffeq "
            f"{'-' if t_nfe is None else f'{t_nfe:.0f}'} NFE")
    return rows


def gmm_rows(targets: list[float], n_eval: int) -> list[dict]:
    """The GMM of the solvers case (D = 16, K = 8, exact score, t_eps 1e-4 here): the pilot on 256 of
    its draws, the error on n_eval other draws against a float64 reference (dopri5 1e-10)."""
    from benchmarks.common.gmm import make_problem

    p = make_problem(4096)
    sde, model = p.sde, p.model
    src = ArraySource("bench:gmm", p.x0[:4096 - n_eval].numpy().astype(np.float32))
    fit, held = pilot_subsets(src)
    x = p.x0[4096 - n_eval:].to(F64)
    with torch.inference_mode():
        z_ref = encode(model, sde, x, SolverConfig("dopri5", rtol=1e-10, atol=1e-10, t_eps=T_EPS, time_var="t",
                                                   control="latent", max_steps=100_000)).x
    base = SolverConfig("dopri5", rtol=1e-6, atol=1e-6, t_eps=T_EPS, time_var="t", control="local")
    rows = []
    for target in targets:
        t0 = time.perf_counter()
        choice, rec = latent_pilot(model, model, sde, fit, held, base, "float32", target)
        wall = time.perf_counter() - t0
        with torch.inference_mode():
            r = encode(model, sde, x.float(), choice)
        err = L.sample_err(r.x, z_ref)
        chosen = next(rw for rw in rec["curve"] if rw.get("chosen"))
        rows.append(dict(model="gmm", target=target, choice=choice.to_dict(), family=chosen["family"],
                         nfe=float(r.nfe.double().mean()), p50=float(np.median(err)),
                         p99=float(np.quantile(err, 0.99)), max=float(err.max()), failed=int((~r.ok).sum()),
                         pilot_fit_p99=chosen["fit"]["p99"], pilot_held_p99=chosen["held"]["p99"],
                         stepped_up=rec["stepped_up"], settings=len(rec["curve"]), pilot_s=wall, tdq_nfe=None,
                         ratio=None, ref_conv=None, met=rec["met"]))
        log(f"  gmm E {target:g}: {describe(rec)}; delivered p99 {rows[-1]['p99']:.2e}")
    return rows


def table(rows: list[dict]) -> str:
    out = ["| model | E | chosen | NFE | delivered p50 / p99 / max | p99 / E | pilot fit / held-out p99 | "
           "settings tried, s | torchdiffeq NFE at that p99 | ratio |", "|---" * 10 + "|"]
    for r in rows:
        up = f" (+{r['stepped_up']} up)" if r["stepped_up"] else ""
        tdq = "-" if r["tdq_nfe"] is None else f"{r['tdq_nfe']:.0f}"
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}x"
        out.append(f"| {r['model']} | {r['target']:g} | {setting_text(r['choice'])}{up} | {r['nfe']:.0f} | "
                   f"{r['p50']:.1e} / {r['p99']:.1e} / {r['max']:.1e} | {r['p99'] / r['target']:.2f} | "
                   f"{r['pilot_fit_p99']:.1e} / {r['pilot_held_p99']:.1e} | {r['settings']}, {r['pilot_s']:.0f} | "
                   f"{tdq} | {ratio} |")
    return "\n".join(out)


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(prog="python -m benchmarks latent_tol", description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="digits,patches,patches0,colour")
    ap.add_argument("--targets", default="1e-3,1e-4")
    ap.add_argument("--n", type=int, default=64, help="held-out test samples per model (the evaluation)")
    ap.add_argument("--gmm", action="store_true", help="also the GMM of the solvers case")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    torch.set_num_threads(2)
    targets = [float(v) for v in a.targets.split(",")]
    rows = []
    for name in [m for m in a.models.split(",") if m]:
        rows += bench(name, targets, a.n)
        if a.json:
            Path(a.json).write_text(json.dumps(rows, indent=1))
    if a.gmm:
        rows += gmm_rows(targets, 1024)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    print(f"# --latent-tol on learned models ({time.strftime('%Y-%m-%d')}, torch {torch.__version__})\n")
    print(table(rows))
    return rows


if __name__ == "__main__":
    main()
