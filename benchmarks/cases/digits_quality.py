"""Quality of trained digits models: latent statistics, reconstruction, and decodes of fresh N(0, I) draws.

For each training budget (steps[:time sampling]), trains the demo's MLP on the 1797 sklearn digits, encodes
them all with the default solver (dopri5, rtol = atol = 1e-5, t_eps = 1e-5), and reports

- latents: max |mean| and max |var - 1| per dim (all dims, and the non-constant ones), max |offdiag corr|
  and max |corr of squares| over the non-constant dims, mean NFE;
- reconstruction (decode the latents): max abs error, RMSE, and whether re-quantised digits
  (17 levels: x -> round((x + 1) 8) / 8 - 1) come back exact;
- a PNG grid of decodes of fresh N(0, I) draws (``WORKDIR/samples_<budget>.png``).

Usage: python -m benchmarks digits_quality [--budgets 2000,8000] [--workdir DIR] [--threads N]
Prints a markdown table (every figure in the run's JSON record). Pure torch: no Prefect, no store.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from pflatents.tasks.ode.batches import decode_block, encode_block
from pflatents.tasks.ode.pfode import SolverConfig
from pflatents.tasks.ode.sde import VPSDE
from pflatents.tasks.data.sources import open_source
from pflatents.tasks.training.train import TrainConfig, fit


def requantise(x: np.ndarray) -> np.ndarray:
    return np.round((x + 1) * 8) / 8 - 1


def latent_stats(z: np.ndarray) -> dict:
    var = z.var(0)
    live = z.std(0) > 1e-3
    zl = z[:, live]
    r = np.corrcoef(zl, rowvar=False)
    zc = zl - zl.mean(0)
    r2 = np.corrcoef(zc**2, rowvar=False)
    off = ~np.eye(r.shape[0], dtype=bool)
    return {"max_abs_mean": float(np.abs(z.mean(0)).max()), "max_abs_var_m1_all": float(np.abs(var - 1).max()),
            "n_constant_dims": int((~live).sum()), "max_abs_var_m1_live": float(np.abs(var[live] - 1).max()),
            "max_abs_corr": float(np.abs(r[off]).max()), "max_abs_corr_sq": float(np.abs(r2[off]).max())}


def grid_png(x: np.ndarray, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = int(np.ceil(np.sqrt(len(x))))
    fig, axes = plt.subplots(n, n, figsize=(n * 0.8, n * 0.8 + 0.4))
    for ax, img in zip(axes.flat, x):
        ax.imshow(np.clip(img.reshape(8, 8), -1, 1), cmap="gray_r", vmin=-1, vmax=1)
    for ax in axes.flat:
        ax.axis("off")
    fig.suptitle(title, fontsize=8)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def run_budget(data: np.ndarray, steps: int, sampling: str, out: Path, n_draws: int, seed: int) -> dict:
    from pflatents.flows.demo import demo_train_config

    sde = VPSDE()
    base = demo_train_config(steps, seed)
    cfg = TrainConfig(**{**base.to_dict(), "time_sampling": sampling})
    t0 = time.perf_counter()
    net = fit(data, sde, cfg).net
    t_train = time.perf_counter() - t0
    from pflatents.tasks.models.checkpoint import CheckpointScore

    model = CheckpointScore(net, sde, {"content_hash": "-"})
    solver, dev = SolverConfig(), torch.device("cpu")
    t0 = time.perf_counter()
    z, nfe, st = encode_block(model, sde, data, solver, 1024, dev)
    t_enc = time.perf_counter() - t0
    xr, nfe_d, st_d = decode_block(model, sde, z, solver, 1024, dev)
    err = np.abs(xr.astype(np.float64) - data)
    exact = (requantise(xr) == data).all(1)
    draws = torch.randn((n_draws, data.shape[1]), generator=torch.Generator().manual_seed(seed + 1)).numpy()
    xs, _, _ = decode_block(model, sde, draws, solver, 1024, dev)
    tag = f"{steps}_{sampling}"
    grid_png(xs, out / f"samples_{tag}.png", f"decodes of N(0,I), {steps} steps, {sampling}")
    grid_png(requantise(xs), out / f"samples_{tag}_requantised.png", f"requantised, {steps} steps, {sampling}")
    return {"steps": steps, "time_sampling": sampling, "train_s": round(t_train, 1), "encode_s": round(t_enc, 1),
            "mean_nfe_encode": float(nfe.mean()), "mean_nfe_decode": float(nfe_d.mean()),
            "failed": int((st != 0).sum() + (st_d != 0).sum()), **latent_stats(z.astype(np.float64)),
            "recon_max_abs": float(err.max()), "recon_rmse": float(np.sqrt((err**2).mean())),
            "requantised_exact": f"{int(exact.sum())}/{len(exact)}",
            "draws_out_of_range": float((np.abs(xs) > 1.1).mean())}


def main(argv: list[str] | None = None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks digits_quality", description=__doc__.splitlines()[0])
    ap.add_argument("--budgets", default="2000,2000:uniform,8000",
                    help="comma list of STEPS[:logsnr|uniform] (default 2000,2000:uniform,8000)")
    ap.add_argument("--workdir", default=str(Path(__file__).parents[1] / "out" / "digits_quality"),
                    help="where the decoded-digit PNGs go")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--draws", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    out = Path(a.workdir)
    out.mkdir(parents=True, exist_ok=True)
    src = open_source("sklearn:digits")
    data = src.read(0, len(src)).x
    rows = []
    for b in a.budgets.split(","):
        steps, _, sampling = b.partition(":")
        rows.append(run_budget(data, int(steps), sampling or "logsnr", out, a.draws, a.seed))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    cols = ["steps", "time_sampling", "train_s", "max_abs_mean", "max_abs_var_m1_live", "max_abs_corr",
            "max_abs_corr_sq", "recon_max_abs", "recon_rmse", "requantised_exact", "mean_nfe_encode"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")
    return {"threads": torch.get_num_threads(), "rows": rows}

