"""Where a `pflatents extract` command's wall time goes, phase by phase, with the shared server up.

Every run is a fresh `pflatents extract` process (``PFLATENTS_SERVER=shared``, the server already up:
started by an untimed first command of each variant) started through a small driver that records, in
the command's own process, when each phase begins (by wrapping the functions that start them), and
the seconds Python's cyclic garbage collector ran (``gc.callbacks``). The phases:

1. interpreter start: from the process's start (``psutil``) to the CLI's ``main``;
2. CLI: parse the flags, import zarr and the store code;
3. job: import torch, validate the data and the model (``job_from_args``, ``prepare``);
4. store: take the lock, create the store;
5. Prefect import and the shared server's lease (``use_server``);
6. flow set-up: import the flow module, make the task runner, start the health watch;
7. flow run start: Prefect's engine creates the run and sets it Running;
8. flow body: the task (read, integrate, write, verify each shard), logs, artifacts;
9. flow run end: Prefect's engine sets the final state;
10. after the flow: publish the sample count, release the lock, print the summary;
11. exit: Prefect drains its queues at exit, the process ends (measured by the parent).

``--before REV`` also times the code of commit REV (``git archive`` into a temporary folder put first
on ``PYTHONPATH``, the same virtual environment), alternating with the working tree's, each with its
own ``PREFECT_HOME``. The trivial job (4,000 x 8 GMM, K = 3, default dopri5, one shard) is the
server_lifecycle case's; ``--big`` runs its ~12 s job instead (100,000 x 64, rk4 10 steps, batch 4096).
The table gives per phase the median over ``--repeats`` runs of each variant; CPU seconds of the
command (and what it reaped) are from ``getrusage``; the task's steps per shard (read, integrate,
write, verify) from the store's shard records.

    nice -n 10 .venv/bin/python -m benchmarks extract_phases [--repeats 5] [--before REV] [--big]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common.jobs import make_job, write_job  # (the ~12 s job, the trivial job)

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[2]

PHASES = [
    ("start", "main", "interpreter start"),
    ("main", "job", "CLI: flags, import zarr and the store code"),
    ("job", "run_pending", "job: import torch, validate data and model"),
    ("run_pending", "use_server", "store: lock, create"),
    ("use_server", "use_server_end", "import Prefect, shared server lease"),
    ("use_server_end", "flow_call", "flow set-up: flow module, runner, health watch"),
    ("flow_call", "body", "flow run start (Prefect engine)"),
    ("body", "body_end", "flow body: task (integrate, write, verify), logs, artifacts"),
    ("body_end", "flow_call_end", "flow run end (Prefect engine)"),
    ("flow_call_end", "main_end", "after the flow: publish, unlock, summary"),
    ("main_end", "end", "exit: Prefect drains its queues, process ends"),
]

# Runs in the timed process: wraps the functions that start each phase, then runs the console script.
DRIVER = r"""
import functools, gc, json, os, sys, time
marks, gc_s, t_gc = {}, [0.0], [0.0]
def cb(phase, info):
    if phase == "start": t_gc[0] = time.perf_counter()
    else: gc_s[0] += time.perf_counter() - t_gc[0]
gc.callbacks.append(cb)
def timed(name, fn):
    @functools.wraps(fn)
    def wrapper(*a, **k):
        marks.setdefault(name, time.time())
        try:
            return fn(*a, **k)
        finally:
            marks.setdefault(name + "_end", time.time())
    return wrapper
import importlib.abc
class Hook(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name not in ("prefect.flows", "pflatents.flows.extract", "pflatents.flows.cli.extract", "pflatents.flows.run"):
            return None
        sys.meta_path.remove(self)
        try:
            import importlib.util
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        run = spec.loader.exec_module
        def exec_module(module):
            run(module)
            if name == "prefect.flows":
                module.Flow.__call__ = timed("flow_call", module.Flow.__call__)
            elif name == "pflatents.flows.extract":
                module.extract.fn = timed("body", module.extract.fn)
            elif name == "pflatents.flows.cli.extract":
                module.job_from_args = timed("job", module.job_from_args)
            else:
                module.run_pending = timed("run_pending", module.run_pending)
        spec.loader.exec_module = exec_module
        return spec
sys.meta_path.insert(0, Hook())
from pflatents.flows import cli, server
server.use_server = timed("use_server", server.use_server)
main = cli.main
def timed_main(*a, **k):
    marks["main"] = time.time()
    try:
        return main(*a, **k)
    finally:
        marks["main_end"] = time.time()
        with open(os.environ["PFLATENTS_PHASES_OUT"], "w") as f:
            json.dump({"marks": marks, "gc_s": gc_s[0], "gc_stats": gc.get_stats(), "tracked": len(gc.get_objects()),
                       "frozen": gc.get_freeze_count()}, f)
cli.main = timed_main
sys.argv = ["pflatents"] + sys.argv[1:]
cli.entry()
"""


def run_once(args: list[str], env: dict, out: Path) -> dict:
    """One timed command: its marks, the parent's start and end, CPU seconds, GC seconds."""
    import psutil

    env = {**env, "PFLATENTS_PHASES_OUT": str(out)}
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.time()
    p = psutil.Popen([sys.executable, "-c", DRIVER, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                     text=True)
    try:
        start = p.create_time()
    except psutil.Error:
        start = t0
    stdout, stderr = p.communicate(timeout=900)
    t1 = time.time()
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if p.returncode != 0:
        raise SystemExit(f"extract failed ({p.returncode}):\n{stderr[-3000:]}")
    rec = json.loads(out.read_text())
    marks = {**rec["marks"], "start": max(t0, min(start, rec["marks"]["main"])), "end": t1}
    return {"marks": marks, "wall": t1 - t0, "cpu": r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime,
            "gc": rec["gc_s"], "gc_stats": rec["gc_stats"], "objects": rec["tracked"] + rec["frozen"],
            "phases": {label: marks[b] - marks[a] for a, b, label in PHASES}}


def shard_seconds(store: Path) -> dict[str, float]:
    """Seconds the store's shard records say the task spent per step, summed over its shards."""
    from pflatents.storage import LatentStore

    sums = {"read_s": 0.0, "integrate_s": 0.0, "write_s": 0.0, "verify_s": 0.0}
    for rec in LatentStore.open(str(store), mode="r").shard_records().values():
        for key in sums:
            sums[key] += float((rec.get("timings") or {}).get(key) or 0.0)
    return sums


def checkout(rev: str, into: Path) -> Path:
    """The package tree of commit ``rev`` as ``into/pflatents`` (for PYTHONPATH)."""
    into.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "--prefix=pflatents/"], capture_output=True,
                             check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def main(argv: list[str] | None = None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks extract_phases", description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5, help="timed runs of each variant")
    ap.add_argument("--before", default=None, help="also time this commit's code (alternating with the tree's)")
    ap.add_argument("--big", action="store_true", help="the ~12 s job instead of the trivial one")
    a = ap.parse_args(argv)
    d = Path(tempfile.mkdtemp(prefix="pflatents-phases-"))
    if a.big:
        data, model = make_job(d, 100_000)
        job = ["--solver", "rk4", "--steps", "10", "--batch-size", "4096"]
    else:
        data, model = write_job(d, 4000, dim=8, k=3)
        job = []
    base = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_PROFILE", "PYTHONPATH")}
    base.update(PFLATENTS_SERVER="shared", OMP_WAIT_POLICY=base.get("OMP_WAIT_POLICY", "PASSIVE"))
    variants = {"now": {**base, "PREFECT_HOME": str(d / "home-now")}}
    if a.before:
        variants = {"before": {**base, "PREFECT_HOME": str(d / "home-before"),
                               "PYTHONPATH": str(checkout(a.before, d / "before"))}, **variants}
    counter = iter(range(10**6))

    def extract(env: dict) -> dict:
        i = next(counter)
        r = run_once(["extract", "--data", str(data), "--model", f"gmm:{model}", "--out", str(d / f"s{i}.zarr"),
                      "--no-progress", *job], env, d / f"phases{i}.json")
        return {**r, "shards": shard_seconds(d / f"s{i}.zarr")}

    runs: dict[str, list[dict]] = {k: [] for k in variants}
    loads: list[float] = []
    try:
        for env in variants.values():
            extract(env)  # untimed: starts the variant's shared server
        for rep in range(a.repeats):
            for name in (list(variants) if rep % 2 == 0 else list(variants)[::-1]):
                loads.append(os.getloadavg()[0])
                runs[name].append(extract(variants[name]))
            print(f"rep {rep}: " + ", ".join(f"{k} {v[-1]['wall']:.2f} s" for k, v in runs.items()), file=sys.stderr,
                  flush=True)
    finally:
        for env in variants.values():
            subprocess.run([str(BIN / "pflatents"), "server", "stop"], env=env, capture_output=True, timeout=120)
    med = {name: {label: statistics.median(r["phases"][label] for r in rs) for _, _, label in PHASES}
           for name, rs in runs.items()}
    summary = {name: {key: statistics.median(r[key] for r in rs) for key in ("wall", "cpu", "gc")}
               for name, rs in runs.items()}
    what = "~12 s job (100,000 x 64, rk4 10 steps)" if a.big else "trivial extract (4,000 x 8, dopri5, one shard)"
    print(f"{what}, shared server up; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load average "
          f"{min(loads):.1f}-{max(loads):.1f}; medians of {a.repeats} runs each\n")
    names = list(variants)
    head = " | ".join(f"{n} (s)" if n == "now" else f"{n} {a.before} (s)" for n in names)
    print(f"| phase | {head} |")
    print("|---|" + "---|" * len(names))
    for _, _, label in PHASES:
        print(f"| {label} | " + " | ".join(f"{med[n][label]:.3f}" for n in names) + " |")
    print("| **wall, end to end** | " + " | ".join(f"**{summary[n]['wall']:.2f}**" for n in names) + " |")
    print("| CPU seconds (the command and what it reaped) | " + " | ".join(f"{summary[n]['cpu']:.2f}" for n in names)
          + " |")
    print("| of which the cyclic garbage collector | " + " | ".join(f"{summary[n]['gc']:.3f}" for n in names) + " |")
    for gen in range(3):
        print(f"| collector passes over generation {gen} (objects freed) | " + " | ".join(
            f"{statistics.median(r['gc_stats'][gen]['collections'] for r in runs[n]):.0f} "
            f"({statistics.median(r['gc_stats'][gen]['collected'] for r in runs[n]):.0f})" for n in names) + " |")
    print("| objects the collector tracks when main() returns | "
          + " | ".join(f"{statistics.median(r['objects'] for r in runs[n]):.0f}" for n in names) + " |")
    steps = {"read_s": "read the data", "integrate_s": "integrate", "write_s": "write", "verify_s": "read back, verify"}
    for key, label in steps.items():
        print(f"| in the task (shard records, all shards): {label} | "
              + " | ".join(f"{statistics.median(r['shards'][key] for r in runs[n]):.3f}" for n in names) + " |")
    return {"phases_median_s": med, "summary_median": summary, "runs": runs, "before": a.before, "big": a.big,
            "load_average_1min": [min(loads), max(loads)]}
