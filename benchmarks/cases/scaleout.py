"""Scale-out benchmark: one extraction job on 1, 2 and 4 dask workers (real processes, loopback, CPU).

Job: GMM (K = 4, D = 64, exact score), ``--n`` samples (default 100,000) drawn from it, VP SDE,
fixed-step rk4 (``--steps``, default 8 -> 32 NFE per sample), shards of ``--shard-size`` samples.
For each worker count a real ``dask scheduler`` and that many ``dask worker --nthreads 1``
processes are started (one torch thread each), and ``pflatents extract --runner dask://...`` runs
as a subprocess against a real ``prefect server start`` (or ``$PREFECT_API_URL`` if set). Reported:
wall time of the CLI, the flow's own samples/s (first task submitted to last shard verified), and
the scaling ratio against 1 worker. The stores of all runs are checked to be bit-identical.

Usage::

    python -m benchmarks scaleout                   # 100k samples, 1/2/4 workers
    python -m benchmarks scaleout --n 20000 --workers 1 2
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

from benchmarks.common.jobs import BIN, free_port, wait_http, write_job
from benchmarks.common.report import md_table

class Procs:
    """Processes started here, stopped by process group at the end."""

    def __init__(self, logdir: Path) -> None:
        self.procs: list[subprocess.Popen] = []
        self.logdir = logdir

    def start(self, name: str, args: list[str], env: dict) -> subprocess.Popen:
        p = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=open(self.logdir / f"{name}.log", "w"),
                             start_new_session=True)
        self.procs.append(p)
        return p

    def stop(self, procs: list[subprocess.Popen] | None = None) -> None:
        for p in reversed(procs if procs is not None else self.procs):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs if procs is not None else self.procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)


def run(n_workers: int, args, d: Path, data: Path, model: Path, env: dict, procs: Procs) -> dict:
    """One extraction on a fresh scheduler with n_workers single-threaded worker processes."""
    port, dash = free_port(), free_port()
    sched = procs.start(f"sched{n_workers}", [str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port",
                                              str(port), "--dashboard-address", f"127.0.0.1:{dash}"], env)
    wait_http(f"http://127.0.0.1:{dash}/health", 120)
    wenv = {**env, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    workers = [procs.start(f"worker{n_workers}_{i}", [str(BIN / "dask"), "worker", f"tcp://127.0.0.1:{port}",
                                                      "--nthreads", "1", "--no-dashboard", "--host", "127.0.0.1"],
                           wenv) for i in range(n_workers)]
    _wait_workers(dash, n_workers)
    out = d / f"w{n_workers}.zarr"
    t0 = time.perf_counter()
    res = subprocess.run([str(BIN / "pflatents"), "extract", "--data", str(data), "--model", f"gmm:{model}",
                          "--out", str(out), "--solver", "rk4", "--steps", str(args.steps), "--shard-size",
                          str(args.shard_size), "--batch-size", str(args.batch_size), "--device", "cpu",
                          "--runner", f"dask://127.0.0.1:{port}", "--no-progress"],
                         env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    procs.stop([*workers, sched])
    if res.returncode != 0:
        raise RuntimeError(f"extract with {n_workers} workers failed:\n{res.stderr[-3000:]}")
    m = re.search(r"in ([\d.]+) s \((\d+) samples/s\)", res.stdout)
    return {"workers": n_workers, "wall_s": wall, "flow_s": float(m.group(1)), "samples_per_s": float(m.group(2)),
            "out": out}


def _wait_workers(dash: int, n: int, timeout: float = 120) -> None:
    """Wait until the scheduler reports n workers (its /info/main/workers.html page lists them)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{dash}/metrics", timeout=2) as r:
                text = r.read().decode()
            m = re.search(r"^dask_scheduler_workers\{state=\"idle\"\} (\d+)", text, re.M)
            total = sum(int(v) for v in re.findall(r"^dask_scheduler_workers\{state=\"\w+\"\} (\d+)", text, re.M))
            if total >= n or (m and int(m.group(1)) >= n):
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{n} dask workers did not join within {timeout} s")


def main(argv: list[str] | None = None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks scaleout", description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000, help="samples (default 100000)")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--shard-size", type=int, default=4096)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = ap.parse_args(argv)
    d = Path(tempfile.mkdtemp(prefix="pflatents-scaleout-"))
    env = {**os.environ, "PREFECT_HOME": str(d / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "DO_NOT_TRACK": "1", "PREFECT_SERVER_UI_ENABLED": "false", "PREFECT_LOGGING_LEVEL": "WARNING"}
    procs = Procs(d)
    try:
        if not env.get("PREFECT_API_URL"):
            port = free_port()
            procs.start("prefect", [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port",
                                    str(port)], env)
            env["PREFECT_API_URL"] = f"http://127.0.0.1:{port}/api"
            wait_http(env["PREFECT_API_URL"] + "/health", 180)
        data, model = write_job(d, args.n)
        print(f"job: GMM D=64 K=4, {args.n} samples, rk4 {args.steps} steps ({4 * args.steps} NFE), shards of "
              f"{args.shard_size}, batch {args.batch_size}; {os.cpu_count()} CPU cores; dask workers --nthreads 1")
        results = [run(w, args, d, data, model, env, procs) for w in args.workers]
        base = results[0]["samples_per_s"] / results[0]["workers"]
        table = []
        for r in results:
            r["speed_up"] = r["samples_per_s"] / results[0]["samples_per_s"]
            r["efficiency"] = r["samples_per_s"] / (base * r["workers"])
            table.append([r["workers"], f"{r['wall_s']:.1f}", f"{r['flow_s']:.1f}", f"{r['samples_per_s']:.0f}",
                          f"{r['speed_up']:.2f}x", f"{r['efficiency']:.0%}"])
        print("\n" + md_table(["workers", "wall s", "flow s", "samples/s", "speed-up", "efficiency"], table) + "\n")
        import zarr

        first = zarr.open_group(str(results[0]["out"]), mode="r")["latents"][:]
        same = all(np.array_equal(first, zarr.open_group(str(r["out"]), mode="r")["latents"][:]) for r in results[1:])
        print(f"latents bit-identical across worker counts: {same}")
        return {"n": args.n, "steps": args.steps, "identical": same,
                "runs": [{k: v for k, v in r.items() if k != "out"} for r in results]}
    finally:
        procs.stop()
        if not args.keep:
            import shutil

            shutil.rmtree(d, ignore_errors=True)

