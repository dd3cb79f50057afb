"""The GPU path end to end: train a U-Net on 32x32x3 patches, extract with Prefect + Zarr, analyze.

    benchmarks/gpu.sh [--device cuda|cpu] [--smoke] [--precision fp32] [--compile auto] ...

(gpu.sh sets up the wheels and the import path, then runs this case: ``python -m benchmarks gpu ...``.) Phases, each timed:

1. data: seeded 32x32x3 patches of scikit-learn's two sample photos, scaled to [-1, 1] (.npy);
2. ``pflatents train --arch unet`` for a fixed wall-clock budget (``--train-seconds``);
3. network-only limit: the trained network's forward pass alone at the chosen precision and
   compile mode, batch ``--batch`` (sample-evaluations/s) -- the ceiling of any integration;
4. core-only loop: ``encode_block`` in this process (no Prefect, no Zarr) on the extract data;
5. ``pflatents extract`` end to end (a subprocess: Prefect flow, Zarr store, records, verification);
   GPU utilisation is sampled by ``nvidia-smi`` (every 200 ms) over this phase alone;
6. latent error: a seeded subset re-encoded in float64 end to end (network, label, state) by dopri5
   at two tight tolerances (``--ref-tols``; their agreement is shown); per-sample max-abs error
   p50/p99/max of the store's latents against it;
7. ``pflatents analyze`` on the store (statistics, reconstruction of ``--n-ref`` samples, no prior
   decodes), stopped after ``--analyze-timeout`` seconds;
8. first, as a yardstick of the core alone: the exact GMM score (D = 64, K = 8) at batch ``--gmm``.

Prints one table and writes it as JSON (``--json PATH``). ``--smoke`` shrinks every size so the
whole pipeline runs on a CPU in a few minutes (the test suite runs it).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

CLI = "import sys; from pflatents.flows.cli import entry; sys.argv[0] = 'pflatents'; entry()"


def patches(n: int, size: int, seed: int) -> np.ndarray:
    """n seeded size x size colour patches of the two sample photos, (n, 3, size, size) in [-1, 1]."""
    from sklearn.datasets import load_sample_images

    ims = load_sample_images().images
    rng = np.random.default_rng(seed)
    out = np.empty((n, 3, size, size), np.float32)
    for i in range(n):
        im = ims[i % len(ims)]
        r, c = rng.integers(0, im.shape[0] - size), rng.integers(0, im.shape[1] - size)
        out[i] = im[r:r + size, c:c + size].transpose(2, 0, 1) / 127.5 - 1.0
    return out


def pflatents(*args: str, env: dict | None = None, timeout: float | None = None) -> tuple[str, float]:
    """Run the CLI in a subprocess; returns (stdout, seconds). Raises with its stderr on failure."""
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", CLI, *args], capture_output=True, text=True, env=env, timeout=timeout)
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"pflatents {' '.join(args[:1])} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r.stdout, dt


class GpuSampler:
    """nvidia-smi utilisation samples (every 200 ms) while the context is open; empty without nvidia-smi."""

    def __enter__(self):
        self.path = Path(tempfile.mkstemp(suffix=".csv")[1])
        self.proc = None
        if shutil.which("nvidia-smi"):
            self.proc = subprocess.Popen(["nvidia-smi", "--query-gpu=utilization.gpu,memory.used",
                                          "--format=csv,noheader,nounits", "-lms", "200"],
                                         stdout=self.path.open("w"), stderr=subprocess.DEVNULL)
        return self

    def __exit__(self, *exc) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        rows = [line.split(",") for line in self.path.read_text().splitlines() if line.strip()]
        self.util = [float(r[0]) for r in rows if r[0].strip().replace(".", "").isdigit()]
        self.mem = [float(r[1]) for r in rows if len(r) > 1 and r[1].strip().replace(".", "").isdigit()]
        self.path.unlink(missing_ok=True)

    def summary(self) -> dict:
        if not self.util:
            return {"gpu_util_mean": None, "gpu_util_busy_mean": None, "gpu_mem_peak_mib": None}
        busy = [u for u in self.util if u > 0]
        return {"gpu_util_mean": float(np.mean(self.util)), "gpu_util_busy_mean": float(np.mean(busy)) if busy else 0.0,
                "gpu_mem_peak_mib": max(self.mem) if self.mem else None, "gpu_util_samples": len(self.util)}


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def network_limit(model, shape, batch: int, dev: torch.device, reps: int) -> float:
    """Sample-evaluations per second of the score model alone (after a warm-up that compiles)."""
    x = torch.randn(batch, *shape, device=dev)
    t = torch.full((batch,), 0.5, dtype=torch.float64, device=dev)
    with torch.inference_mode():
        for _ in range(3):
            model(x, t)
        sync(dev)
        t0 = time.perf_counter()
        for _ in range(reps):
            model(x, t)
        sync(dev)
    return batch * reps / (time.perf_counter() - t0)


def gmm_core(dev: torch.device, n: int, say) -> list[dict]:
    """The exact GMM score (D = 64, K = 8) in the core loop: dopri5 and rk4 (10 steps), float32, one batch."""
    from pflatents.tasks.models.scores import GaussianMixtureScore
    from pflatents.tasks.ode.pfode import SolverConfig, encode
    from pflatents.tasks.ode.sde import VPSDE

    g, d, k = torch.Generator().manual_seed(0), 64, 8
    means = torch.randn(k, d, generator=g, dtype=torch.float64) * 1.5
    qs = [torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0] for _ in range(k)]
    covs = torch.stack([(q * (0.05 + 0.95 * torch.rand(d, generator=g, dtype=torch.float64))) @ q.T for q in qs])
    w = torch.full((k,), 1.0 / k, dtype=torch.float64)
    sde = VPSDE()
    gmm = GaussianMixtureScore(w, means, covs, sde)
    comp = torch.multinomial(w, n, replacement=True, generator=g)
    x = means[comp] + torch.einsum("nij,nj->ni", torch.linalg.cholesky(covs)[comp],
                                   torch.randn(n, d, generator=g, dtype=torch.float64))
    x = x.to(dev, torch.float32)
    rows = []
    for name, kw in (("dopri5", {}), ("rk4", {"steps": 10})):
        cfg = SolverConfig(name, **kw)
        encode(gmm, sde, x[:256], cfg)
        sync(dev)
        t0 = time.perf_counter()
        r = encode(gmm, sde, x, cfg)
        sync(dev)
        rows.append({"solver": name, "samples_per_s": n / (time.perf_counter() - t0), "mean_nfe": float(r.nfe.double().mean())})
        say(f"gmm core only ({name}, batch {n}): {rows[-1]['samples_per_s']:,.0f} samples/s, mean NFE {rows[-1]['mean_nfe']:.1f}")
    return rows


def main(argv: list[str] | None = None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks gpu")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (CPU test of the whole pipeline)")
    ap.add_argument("--workdir", default=None, help="where data, checkpoint and store go (default: a temp dir)")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "tf32", "bf16", "fp64"])
    ap.add_argument("--compile", default="auto", choices=["auto", "on", "off"])
    ap.add_argument("--solver", default="rk4")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4096, help="extract batch size (and shard size)")
    ap.add_argument("--n-train", type=int, default=20000)
    ap.add_argument("--n-extract", type=int, default=16384)
    ap.add_argument("--n-ref", type=int, default=128, help="samples of the float64 reference")
    ap.add_argument("--ref-tols", default="1e-7,1e-9",
                    help="dopri5 tolerances of the float64 reference, loose then tight (their agreement is printed)")
    ap.add_argument("--train-seconds", type=float, default=60.0)
    ap.add_argument("--channels", type=int, default=32, help="U-Net base channels")
    ap.add_argument("--size", type=int, default=32, help="patch side (patches are size x size x 3)")
    ap.add_argument("--analyze-timeout", type=float, default=180.0, help="stop analyze after this many seconds")
    ap.add_argument("--workers", type=int, default=1,
                    help="extract's concurrent shard tasks (2 overlaps one shard's store write with the next's integration)")
    ap.add_argument("--gmm", type=int, default=32768, help="batch of the GMM core-only figure (0 skips)")
    ap.add_argument("--json", default=None, help="also write the results here")
    a = ap.parse_args(argv)
    if a.smoke:
        a.n_train, a.n_extract, a.n_ref, a.train_seconds = 256, 48, 8, 5.0
        a.batch, a.channels, a.steps, a.size, a.gmm = 16, 8, min(a.steps, 4), 8, min(a.gmm, 64)
    from pflatents.tasks.models.registry import resolve_device

    dev = resolve_device(a.device)
    work = Path(a.workdir or tempfile.mkdtemp(prefix="pfl-gpu-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    res: dict = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
                 "torch": torch.__version__, "settings": {k: v for k, v in vars(a).items() if k != "json"}}
    say = lambda s: print(s, flush=True)  # noqa: E731

    if a.gmm:
        res["gmm_core"] = gmm_core(dev, a.gmm, say)
    t0 = time.perf_counter()
    data = patches(a.n_train + a.n_extract, a.size, seed=0)
    np.save(work / "train.npy", data[:a.n_train])
    np.save(work / "extract.npy", data[a.n_train:])
    res["data_s"] = time.perf_counter() - t0
    say(f"data: {a.n_train} training + {a.n_extract} extract patches {a.size}x{a.size}x3 in {res['data_s']:.1f} s")

    ck = work / "unet"
    out, dt = pflatents("train", "--data", str(work / "train.npy"), "--out", str(ck), "--arch", "unet",
                        "--channels", str(a.channels), "--steps", "1000000", "--max-seconds", str(a.train_seconds),
                        "--batch-size", str(min(512, a.n_train)), "--device", str(dev), "--overwrite",
                        "--no-progress", env=env)
    doc = json.loads((ck / "config.json").read_text())
    res["train"] = {"wall_s": dt, "steps": doc["summary"]["steps_done"], "fit_s": doc["provenance"]["seconds"],
                    "loss_last_100": doc["summary"]["loss_last_100"]}
    say(f"train: {res['train']['steps']} steps in {res['train']['fit_s']:.1f} s (wall {dt:.1f} s), "
        f"loss {res['train']['loss_last_100']:.4f}")

    from pflatents.tasks.models.registry import load_model
    from pflatents.tasks.ode.batches import encode_block
    from pflatents.tasks.ode.pfode import SolverConfig, encode
    from pflatents.tasks.ode.sde import VPSDE

    sde = VPSDE()
    model = load_model(str(ck), sde, precision=a.precision, compile=a.compile)
    t0 = time.perf_counter()
    rate = network_limit(model, (3, a.size, a.size), a.batch, dev, reps=3 if a.smoke else 20)
    res["network_only"] = {"sample_evals_per_s": rate, "first_call_s": time.perf_counter() - t0,
                           "compile": model.net.compile_state(dev)}
    say(f"network only ({a.precision}, compile {a.compile}: {res['network_only']['compile']}): "
        f"{rate:,.0f} sample-evaluations/s at batch {a.batch}")

    cfg = SolverConfig(a.solver, steps=a.steps)
    x_ext = np.load(work / "extract.npy")
    sync(dev)
    t0 = time.perf_counter()
    _, nfe, status = encode_block(model, sde, x_ext, cfg, a.batch, dev, "float32")
    sync(dev)
    core_s = time.perf_counter() - t0
    res["core_only"] = {"samples_per_s": a.n_extract / core_s, "mean_nfe": float(nfe.mean()), "seconds": core_s,
                        "failed": int((status != 0).sum())}
    res["core_only"]["fraction_of_network_limit"] = res["core_only"]["samples_per_s"] * nfe.mean() / rate
    say(f"core only: {res['core_only']['samples_per_s']:,.0f} samples/s, mean NFE {nfe.mean():.1f} "
        f"({res['core_only']['fraction_of_network_limit']:.2f} of the network-only rate)")

    store = work / "latents.zarr"
    with GpuSampler() as smi:
        out, dt = pflatents("extract", "--data", str(work / "extract.npy"), "--model", str(ck), "--out", str(store),
                            "--solver", a.solver, "--steps", str(a.steps), "--precision", a.precision,
                            "--compile", a.compile, "--batch-size", str(a.batch), "--shard-size", str(a.batch),
                            "--device", str(dev), "--workers", str(a.workers), "--no-progress", env=env)
    m = re.search(r"done: (\d+) samples in ([\d.]+) s \((\d+) samples/s\), mean NFE ([\d.]+)", out)
    res["extract"] = {"wall_s": dt, "samples_per_s_wall": a.n_extract / dt, **smi.summary()}
    if m:
        res["extract"].update(samples_per_s=float(m.group(3)), flow_s=float(m.group(2)), mean_nfe=float(m.group(4)))
        res["extract"]["vs_core_only"] = res["extract"]["samples_per_s"] / res["core_only"]["samples_per_s"]
    say(f"extract end to end: {out.strip().splitlines()[-1] if out.strip() else '?'} (process wall {dt:.1f} s, "
        f"GPU utilisation mean {res['extract']['gpu_util_mean']})")

    from pflatents.storage import LatentStore

    res["extract"].update(shard_timings(LatentStore.open(str(store), mode="r")))
    say(f"extract shards after the first (compile done): {res['extract']['steady_samples_per_s']:,.0f} samples/s "
        f"per task; read {res['extract']['read_fraction']:.0%}, write + verify {res['extract']['write_fraction']:.0%}")
    z = np.asarray(LatentStore.open(str(store), mode="r").latents_array()[:a.n_ref])
    ref_model = load_model(str(ck), sde, precision="fp64", compile="off")
    x_ref = torch.from_numpy(x_ext[:a.n_ref]).to(dev, torch.float64)
    refs, t0 = [], time.perf_counter()
    tols = (1e-6, 1e-8) if a.smoke else tuple(float(v) for v in a.ref_tols.split(","))
    with torch.inference_mode():
        for tol in tols:
            r = encode(ref_model, sde, x_ref, SolverConfig("dopri5", rtol=tol, atol=tol, max_steps=100_000))
            refs.append(r.x.double().cpu().reshape(a.n_ref, -1).numpy())
    err = np.abs(z.reshape(a.n_ref, -1) - refs[-1]).max(1)
    conv = float(np.abs(refs[0] - refs[1]).max())
    res["latent_error"] = {"p50": float(np.quantile(err, 0.5)), "p99": float(np.quantile(err, 0.99)),
                           "max": float(err.max()), "reference_convergence": conv, "n": a.n_ref,
                           "reference_s": time.perf_counter() - t0}
    say(f"latent error vs float64 reference ({a.n_ref} samples, reference tolerances {tols} agree to {conv:.1e}): "
        f"p50 {res['latent_error']['p50']:.1e}, p99 {res['latent_error']['p99']:.1e}, max {err.max():.1e}")

    t0 = time.perf_counter()
    try:
        out, dt = pflatents("analyze", str(store), "--reconstruct", str(a.n_ref), "--prior", "0", "--json",
                            "--device", str(dev), env=env, timeout=a.analyze_timeout)
        res["analyze"] = {"wall_s": dt}
        say(f"analyze: {dt:.1f} s")
    except subprocess.TimeoutExpired:
        res["analyze"] = {"wall_s": None, "timed_out_after_s": time.perf_counter() - t0}
        say(f"analyze: stopped after {a.analyze_timeout:.0f} s (--analyze-timeout)")
    _table(res, say)
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2, default=str))
    return res


def shard_timings(store) -> dict:
    """From the shard records: samples/s of one task over the shards after the first (the first
    carries the compile), and the shares of reading and of writing + verifying in the task time."""
    recs = sorted(store.shard_records().items())
    t = {k: 0.0 for k in ("read_s", "integrate_s", "write_s", "verify_s")}
    n = 0
    for _, r in recs[1:] or recs:
        for k in t:
            t[k] += float(r.get("timings", {}).get(k, 0.0))
        n += int(r["stop"]) - int(r["start"])
    total = sum(t.values()) or float("nan")
    return {"steady_samples_per_s": n / total, "read_fraction": t["read_s"] / total,
            "write_fraction": (t["write_s"] + t["verify_s"]) / total}


def _table(res: dict, say) -> None:
    e, c, n, le = res["extract"], res["core_only"], res["network_only"], res["latent_error"]
    rows = [("device", res["device"]), ("samples/s end to end (flow)", e.get("samples_per_s")),
            ("samples/s end to end (process wall, incl. start-up and compile)", e["samples_per_s_wall"]),
            ("samples/s of one extract task after the first shard", e.get("steady_samples_per_s")),
            ("samples/s core only", c["samples_per_s"]), ("end to end / core only", e.get("vs_core_only")),
            ("mean NFE", e.get("mean_nfe", c["mean_nfe"])), ("network-only limit, sample-evals/s", n["sample_evals_per_s"]),
            ("core throughput x NFE / network limit", c["fraction_of_network_limit"]),
            ("GPU utilisation during extract, mean %", e["gpu_util_mean"]),
            ("p99 latent error vs float64", le["p99"]), ("max latent error vs float64", le["max"])]
    say("\n| figure | value |\n|---|---|")
    for k, v in rows:
        say(f"| {k} | {v:,.4g} |" if isinstance(v, float) else f"| {k} | {v} |")

