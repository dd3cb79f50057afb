"""End-to-end `pflatents extract` vs a bare loop that encodes the same batches and np.saves them.

Both run as fresh subprocesses (interpreter start and imports included), on the same 100,000 x 64
GMM samples with the same fixed-step solver and batch size, with the same OpenMP wait policy (the
CLI's default, PASSIVE); the ratio is extract / bare (goal <= 1.10). The two alternate --repeats
times per step count (this VM's speed drifts by +-30 % between minutes): the table gives the median
and the minimum of each side, and per-shard integration times (the bare loop's, and the ones the
store's shard records hold) to split the gap into fixed start/stop cost and per-shard cost.

    .venv/bin/python -m benchmarks extract_overhead [--n 100000] [--steps 10,32] [--repeats 3] [--server]

rk4 with 32 steps (128 NFE) costs about what the default dopri5 does on such data (~130 NFE);
10 steps is a deliberately light job where the fixed cost weighs most.

--server starts a real `prefect server start` first and points both at it (an operator's set-up);
without it extract uses Prefect's temporary local server, whose start-up is included in the time.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common.jobs import BARE, BIN, make_job, start_prefect_server, stop


def timed(cmd: list[str], env: dict) -> tuple[float, str]:
    t0 = time.perf_counter()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"{cmd[:3]} failed:\n{res.stderr[-3000:]}")
    return time.perf_counter() - t0, res.stdout


def shard_seconds(store: Path) -> list[float]:
    """Per-shard integrate + write + verify seconds from the store's shard records."""
    import zarr

    g = zarr.open_group(str(store), mode="r")
    recs = sorted((int(n), grp.attrs.asdict()) for n, grp in g["shards"].groups())
    return [sum(r["timings"].values()) for _, r in recs]


def main(argv: list[str] | None = None):
    import statistics

    ap = argparse.ArgumentParser(prog="python -m benchmarks extract_overhead", description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--steps", default="10,32", help="comma-separated rk4 step counts (4 NFE each)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--server", action="store_true", help="run against a real Prefect server")
    a = ap.parse_args(argv)
    d = Path(tempfile.mkdtemp(prefix="pfl-bench-"))
    data, model = make_job(d, a.n)
    shard = 32768  # the store's default for 256-byte samples (8 MiB chunks)
    env = {**os.environ, "PREFECT_HOME": str(d / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "DO_NOT_TRACK": "1", "PREFECT_SERVER_UI_ENABLED": "false"}
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # what the CLI sets; the bare loop gets the same
    env.pop("PREFECT_API_URL", None)
    server = None
    if a.server:
        server, url = start_prefect_server(env)
        env["PREFECT_API_URL"] = url + "/api"
    rows = []
    try:
        for steps in [int(v) for v in a.steps.split(",")]:
            bare, ext, bare_sh, ext_sh = [], [], [], []
            for rep in range(a.repeats):
                out = d / f"bare{steps}_{rep}"
                out.mkdir()
                wall, stdout = timed([sys.executable, "-c", BARE, str(data), str(model), str(out), str(steps),
                                      str(a.batch_size), str(shard)], env)
                bare.append(wall)
                bare_sh.append(sum(float(v) for v in stdout.split()))
                store = d / f"out{steps}_{rep}.zarr"
                wall, _ = timed([str(BIN / "pflatents"), "extract", "--data", str(data), "--model", f"gmm:{model}",
                                 "--out", str(store), "--solver", "rk4", "--steps", str(steps),
                                 "--batch-size", str(a.batch_size), "--no-progress"], env)
                ext.append(wall)
                ext_sh.append(sum(shard_seconds(store)))
                print(f"steps {steps} run {rep}: bare {bare[-1]:.1f} s (shards {bare_sh[-1]:.1f} s), extract "
                      f"{ext[-1]:.1f} s (shards {ext_sh[-1]:.1f} s)", file=sys.stderr, flush=True)
            med = statistics.median
            rows.append((steps, med(bare), min(bare), med(ext), min(ext), med(ext) / med(bare), min(ext) / min(bare),
                         med(bare) - med(bare_sh), med(ext) - med(ext_sh), med(ext_sh) / med(bare_sh)))
    finally:
        if server is not None:
            stop(server, 30)
    mode = "real Prefect server" if a.server else "temporary local server (start-up included)"
    print(f"{a.n} x 64 GMM (K=8), rk4, batch {a.batch_size}, shards of {shard}, {mode}, OMP_WAIT_POLICY="
          f"{env['OMP_WAIT_POLICY']}, {a.repeats} alternating runs each\n")
    print("| rk4 steps | bare s (median / min) | extract s (median / min) | ratio of medians | ratio of minima | "
          "bare outside shards s | extract outside shards s | shard time extract / bare |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]:.1f} / {r[2]:.1f} | {r[3]:.1f} / {r[4]:.1f} | {r[5]:.2f} | {r[6]:.2f} | {r[7]:.1f} | "
              f"{r[8]:.1f} | {r[9]:.2f} |")
    keys = ("steps", "bare_median_s", "bare_min_s", "extract_median_s", "extract_min_s", "ratio_of_medians",
            "ratio_of_minima", "bare_outside_shards_s", "extract_outside_shards_s", "shard_time_ratio")
    return {"n": a.n, "mode": mode, "repeats": a.repeats, "rows": [dict(zip(keys, r)) for r in rows]}

