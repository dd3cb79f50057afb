"""End-to-end time of a small `pflatents extract` with and without the managed local Prefect server.

The job: 4,000 x 8 samples of a 3-component GMM with its exact score, default solver (dopri5),
one shard. Every run is a fresh `pflatents extract` process (interpreter start and imports
included) into a new store, on a fresh ``PREFECT_HOME``:

1. without a server: Prefect's temporary server starts inside the command (first run on the
   fresh database, then ``--repeats`` more on the existing one);
2. `pflatents server start` (timed), then ``--repeats`` runs that find it automatically;
   `pflatents server stop`.

Also timed: `pflatents status` on the store (interpreter start + CLI imports, no Prefect) and the
flow's own integration time (the "done: ... in X s" line). The machine's load average is printed
with each figure: on a shared VM the figures move with it.

    .venv/bin/python benchmarks/local_start.py [--n 4000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from scaleout import write_job  # noqa: E402  (the GMM job generator the benchmarks share)


def timed(args: list[str], env: dict) -> tuple[float, str]:
    t0 = time.perf_counter()
    res = subprocess.run([str(BIN / "pflatents"), *args], env=env, capture_output=True, text=True, timeout=600)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"pflatents {' '.join(args)} failed ({res.returncode}):\n{res.stderr[-2000:]}")
    return wall, res.stdout + res.stderr


def extract(d: Path, data: Path, model: Path, env: dict, i: int) -> dict:
    wall, out = timed(["extract", "--data", str(data), "--model", f"gmm:{model}", "--out", str(d / f"o{i}.zarr"),
                       "--no-progress"], env)
    m = re.search(r"done: \d+ samples in ([0-9.]+) s", out)
    return {"wall_s": wall, "flow_s": float(m.group(1)) if m else None, "load1": os.getloadavg()[0],
            "noted": "pflatents server start" in out}


def summary(runs: list[dict]) -> str:
    w = [r["wall_s"] for r in runs]
    flow = statistics.median([r["flow_s"] for r in runs])
    each = ", ".join("%.2f" % x for x in w)
    load = ", ".join("%.1f" % r["load1"] for r in runs)
    return f"median {statistics.median(w):.2f} s, min {min(w):.2f} s (runs {each}); flow {flow:.2f} s; load {load}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4000)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    d = Path(tempfile.mkdtemp(prefix="pflatents-local-start-"))
    data, model = write_job(d, a.n, dim=8, k=3)
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_PROFILE")}
    env.update(PREFECT_HOME=str(d / "prefect-home"), PYTHONUNBUFFERED="1")
    results: dict = {"n": a.n, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}

    first = extract(d, data, model, env, 0)
    more = [extract(d, data, model, env, i) for i in range(1, a.repeats + 1)]
    results["temporary_first"], results["temporary"] = first, more
    print(f"temporary server, fresh PREFECT_HOME: {first['wall_s']:.2f} s (load {first['load1']:.1f}); "
          f"the note was printed: {first['noted']}")
    print(f"temporary server, existing database: {summary(more)}")

    t_start, _ = timed(["server", "start"], env)
    try:
        managed = [extract(d, data, model, env, 100 + i) for i in range(a.repeats)]
        status = [timed(["status", str(d / "o100.zarr")], env)[0] for _ in range(a.repeats)]
    finally:
        timed(["server", "stop"], env)
    results.update(server_start_s=t_start, managed=managed, status_s=status)
    print(f"pflatents server start: {t_start:.2f} s")
    print(f"managed server: {summary(managed)}; the note was printed: {any(r['noted'] for r in managed)}")
    print(f"pflatents status (no Prefect): median {statistics.median(status):.2f} s")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
