"""Several shards per task: the writer-thread overlap, and the Prefect task count, on a GMM job.

    .venv/bin/python -m benchmarks task_groups [--n 50000] [--dim 64] [--shard 1000] [--steps 10] [--repeats 3]

1. in-process, no Prefect: ``run_shards`` over every shard of a fresh store, with the store write +
   read-back verification of shard i in a writer thread while shard i+1 integrates (overlap) and
   without (each shard written before the next starts). Fresh stores each repeat, the two alternate
   (this VM's speed drifts between minutes); medians. The write + verify share comes from the shard
   records' ``write_s`` + ``verify_s``.
2. end to end: ``pflatents extract`` (a subprocess with Prefect's temporary server) with one shard
   per task vs the default grouping; the flow's own seconds (printed by extract) and the task count.

The overlap can gain at most the write + verify share; on a 2-core CPU the writer competes with
torch's threads for the cores, so the gain measured here is a floor for a GPU, where integration
leaves the CPU idle.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path


os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # what the CLI sets (before torch is imported)
from benchmarks.common.jobs import BIN, write_job  # noqa: E402  (the GMM job generator the benchmarks share)
from benchmarks.common.report import md_table  # noqa: E402


def in_process(data: Path, model: Path, out: Path, a, overlap: bool) -> tuple[float, float]:
    """(samples/s, write + verify share of the wall time) of run_shards over a fresh store."""
    from pflatents.flows.coordinator import Job, make_store, prepare
    from pflatents.tasks.wrappers.extract import run_shards

    shutil.rmtree(out, ignore_errors=True)
    job = Job(data=str(data), model=f"gmm:{model}", out=str(out), solver="rk4", steps=a.steps,
              shard_size=a.shard, batch_size=a.batch).resolved()
    store = make_store(prepare(job))
    t0 = time.perf_counter()
    run_shards(job.out, list(range(store.n_shards)), "cpu", None, overlap=overlap)
    wall = time.perf_counter() - t0
    records = store.shard_records()
    wv = sum(r["timings"]["write_s"] + r["timings"]["verify_s"] for r in records.values())
    return a.n / wall, wv / wall


def end_to_end(data: Path, model: Path, out: Path, a, per_task: int | None) -> tuple[float, int]:
    """(flow samples/s, task runs) of `pflatents extract` with per_task shards per task (None: default)."""
    shutil.rmtree(out, ignore_errors=True)
    extra = ["--shards-per-task", str(per_task)] if per_task else []
    res = subprocess.run([str(BIN / "pflatents"), "extract", "--data", str(data), "--model", f"gmm:{model}",
                          "--out", str(out), "--shard-size", str(a.shard), "--batch-size", str(a.batch),
                          "--solver", "rk4", "--steps", str(a.steps), "--no-progress", "--device", "cpu", *extra],
                         capture_output=True, text=True, env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    m = re.search(r"done: (\d+) samples in ([\d.]+) s", res.stdout)
    if res.returncode or not m:
        raise SystemExit(f"extract failed: {res.stdout}\n{res.stderr}")
    from pflatents.flows.extract import shards_per_task

    n_shards = -(-a.n // a.shard)
    k = per_task or shards_per_task(n_shards, a.shard, a.batch, 1)
    return a.n / float(m.group(2)), -(-n_shards // k)


def main(argv: list[str] | None = None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks task_groups", description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=50_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--shard", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-e2e", action="store_true")
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data, model = write_job(tmp, a.n, a.dim, k=8)
        print(f"{a.n} x {a.dim} GMM (K=8), rk4 {a.steps} steps, shards of {a.shard}, batch {a.batch}, "
              f"{a.repeats} alternating runs each (medians)\n")
        table, rec = [], {}
        runs: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
        for _ in range(a.repeats):
            for overlap in (False, True):
                runs[overlap].append(in_process(data, model, tmp / "s.zarr", a, overlap))
        for overlap in (False, True):
            rate = statistics.median(r[0] for r in runs[overlap])
            share = statistics.median(r[1] for r in runs[overlap])
            table.append([f"`run_shards` in-process, {'writer thread (overlap)' if overlap else 'write after each shard'}",
                          "-", f"{rate:,.0f}", f"{share:.0%}"])
            rec["overlap" if overlap else "sequential"] = {"samples_per_s": rate, "write_verify_share": share}
        rec["overlap_gain"] = rec["overlap"]["samples_per_s"] / rec["sequential"]["samples_per_s"]
        header = ["", "task runs", "samples/s", "write + verify share of wall"]
        if a.skip_e2e:
            print(md_table(header, table) + f"\n\noverlap / sequential: {rec['overlap_gain']:.2f}x")
            return rec
        e2e: dict[int | None, list[tuple[float, int]]] = {1: [], None: []}
        for _ in range(a.repeats):
            for k in (1, None):
                e2e[k].append(end_to_end(data, model, tmp / "e.zarr", a, k))
        for k in (1, None):
            rate = statistics.median(r[0] for r in e2e[k])
            table.append([f"`pflatents extract` {'--shards-per-task 1' if k else 'default grouping'} (flow time)",
                          e2e[k][0][1], f"{rate:,.0f}", "-"])
            rec["extract_per_task_1" if k else "extract_default"] = {"task_runs": e2e[k][0][1], "samples_per_s": rate}
        print(md_table(header, table) + f"\n\noverlap / sequential: {rec['overlap_gain']:.2f}x")
        return rec

