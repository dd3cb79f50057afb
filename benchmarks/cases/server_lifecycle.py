"""Which local Prefect server makes commands fast by default: the shared server or a server per command.

Every run is a fresh `pflatents` process (interpreter start and imports included) on its own
``PREFECT_HOME`` (the same one for every run of a mode), with ``PREFECT_API_URL`` unset:

- ``shared``: ``PFLATENTS_SERVER=shared`` (the default) with the shared server already up (started by
  an untimed first command); ``shared-first``: the command that starts it (its start-up included).
- ``off``: ``PFLATENTS_SERVER=off``, the command's own server, launched as the command starts so that
  it comes up while the command imports torch and Prefect, and stopped when it ends.

Two jobs: a trivial extract (4,000 x 8 GMM, K = 3, default dopri5, one shard; goal <= 3 s on a warm
machine) and a ~12 s one (100,000 x 64 GMM, K = 8, rk4 10 steps, batch 4096: the job of
the extract_overhead case) against its bare loop (goal <= 1.10x). The modes and
the bare loop alternate, ``--repeats`` times; the table gives median, min and max of each.

    nice -n 10 .venv/bin/python -m benchmarks server_lifecycle [--repeats 5] [--big-repeats 3] [--skip-big]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common.jobs import BARE, BIN, make_job, write_job  # noqa: E402  (the GMM jobs, the bare loop)


CPU: list[float] = []  # CPU seconds of each run() (the command, what it reaped, and the shared server)


def shared_server_cpu(env: dict) -> float:
    """CPU seconds used so far by the shared server of env's PREFECT_HOME (0 when none runs)."""
    import json

    import psutil

    try:
        pid = json.loads((Path(env["PREFECT_HOME"]) / "pflatents-server.json").read_text())["pid"]
        t = psutil.Process(pid).cpu_times()
        return t.user + t.system
    except (OSError, ValueError, KeyError, psutil.Error):
        return 0.0


def run(cmd: list[str], env: dict) -> float:
    """Wall seconds of one command; its CPU seconds go to CPU (robust to other jobs on the machine)."""
    import resource

    r0, s0 = resource.getrusage(resource.RUSAGE_CHILDREN), shared_server_cpu(env)
    t0 = time.perf_counter()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    wall = time.perf_counter() - t0
    r1, s1 = resource.getrusage(resource.RUSAGE_CHILDREN), shared_server_cpu(env)
    CPU.append(r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime + max(0.0, s1 - s0))
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:3])} failed ({res.returncode}):\n{res.stderr[-3000:]}")
    return wall


def pfl(*args: str) -> list[str]:
    return [str(BIN / "pflatents"), *args]


def row(name: str, xs: list[float], ref: list[float] | None = None) -> str:
    med = statistics.median(xs)
    ratio = f" | {med / statistics.median(ref):.2f}" if ref else " | -"
    return f"| {name} | {med:.2f} | {min(xs):.2f} | {max(xs):.2f} | {len(xs)}{ratio} |"


def main(argv: list[str] | None = None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks server_lifecycle", description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5, help="runs of each mode on the trivial job")
    ap.add_argument("--big-repeats", type=int, default=3, help="runs of each on the ~12 s job")
    ap.add_argument("--skip-big", action="store_true")
    a = ap.parse_args(argv)
    d = Path(tempfile.mkdtemp(prefix="pflatents-server-bench-"))
    small_data, small_model = write_job(d, 4000, dim=8, k=3)
    base = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_PROFILE")}
    base.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    envs = {"shared": {**base, "PFLATENTS_SERVER": "shared", "PREFECT_HOME": str(d / "home-shared")},
            "off": {**base, "PFLATENTS_SERVER": "off", "PREFECT_HOME": str(d / "home-off")}}
    loads: list[float] = []
    counter = iter(range(10**6))

    def small(mode: str) -> float:
        loads.append(os.getloadavg()[0])
        return run(pfl("extract", "--data", str(small_data), "--model", f"gmm:{small_model}", "--out",
                       str(d / f"s{next(counter)}.zarr"), "--no-progress"), envs[mode])

    times: dict[str, list[float]] = {"shared-first": [], "shared": [], "off": [], "bare": [], "big-shared": [],
                                     "big-off": []}
    cpu: dict[str, list[float]] = {k: [] for k in times}

    def add(key: str, wall: float) -> None:
        times[key].append(wall)
        cpu[key].append(CPU[-1])
    try:
        small("off")  # untimed: creates the off mode's database
        add("shared-first", small("shared"))  # fresh database: creates it, starts the server
        run(pfl("server", "stop"), envs["shared"])
        add("shared-first", small("shared"))  # existing database
        for _ in range(a.repeats):
            add("off", small("off"))
            add("shared", small("shared"))
        print(f"trivial job done, load {min(loads):.1f}-{max(loads):.1f}", file=sys.stderr, flush=True)
        if not a.skip_big:
            big = d / "big"
            big.mkdir()
            data, model = make_job(big, 100_000)
            for rep in range(a.big_repeats):
                out = big / f"bare{rep}"
                out.mkdir()
                loads.append(os.getloadavg()[0])
                add("bare", run([sys.executable, "-c", BARE, str(data), str(model), str(out), "10", "4096", "32768"],
                                base))
                for mode in ("shared", "off"):
                    loads.append(os.getloadavg()[0])
                    add(f"big-{mode}", run(pfl("extract", "--data", str(data), "--model", f"gmm:{model}", "--out",
                                               str(big / f"{mode}{rep}.zarr"), "--solver", "rk4", "--steps", "10",
                                               "--batch-size", "4096", "--no-progress"), envs[mode]))
                print(f"big rep {rep}: bare {times['bare'][-1]:.1f} s, shared {times['big-shared'][-1]:.1f} s, "
                      f"off {times['big-off'][-1]:.1f} s", file=sys.stderr, flush=True)
    finally:
        subprocess.run(pfl("server", "stop"), env=envs["shared"], capture_output=True, timeout=120)
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load average {min(loads):.1f}-{max(loads):.1f}\n")
    names = {"shared-first": "trivial extract, shared server starting (first use: fresh db, then existing db)",
             "shared": "trivial extract, shared server up (the default)",
             "off": "trivial extract, PFLATENTS_SERVER=off (own server)",
             "bare": "~12 s job: bare loop", "big-shared": "~12 s job: extract, shared server up",
             "big-off": "~12 s job: extract, PFLATENTS_SERVER=off"}
    for title, data in (("wall seconds", times), ("CPU seconds (command, its children, the shared server)", cpu)):
        print(f"\n{title}\n")
        print("| run | median | min | max | runs | median / bare |")
        print("|---|---|---|---|---|---|")
        for key, name in names.items():
            if data[key]:
                print(row(name, data[key], data["bare"] if key.startswith("big-") else None))
    return {"wall_s": times, "cpu_s": cpu, "load_average_1min": [min(loads), max(loads)]}
