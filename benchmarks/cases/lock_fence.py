"""Cost of the store lock and of fencing writes on its token (local disk).

    .venv/bin/python -m benchmarks lock_fence [--rows 400000] [--dim 64] [--repeats 5]

Rows: the verified ``write_shard`` path over a whole store (default shard size, ~8 MiB chunks),
unfenced vs fenced on a held ``FileLock`` (each record write first checks the lock's token: one
read of the lock file and one flock probe), kinds alternating over fresh stores; and the time of
one ``check`` and of one ``acquire`` + ``release`` of the kernel lock, median over many calls.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common.report import md_table
from pflatents.storage import default_shard_size, open_or_create, store_lock


def write_all(root: Path, x: np.ndarray, nfe: np.ndarray, fenced: bool) -> float:
    shard = default_shard_size(4 * x.shape[1], len(x))
    store = open_or_create(str(root), config={"bench": 1}, n_samples=len(x), sample_shape=x.shape[1:],
                           shard_size=shard)
    lock = store_lock(str(root))
    lock.acquire({"bench": "fence"})
    store.fence(lock.token if fenced else None)
    t0 = time.perf_counter()
    for i in range(store.n_shards):
        i0, i1 = store.shard_range(i)
        store.write_shard(i, x[i0:i1], nfe[i0:i1])
    seconds = time.perf_counter() - t0
    lock.release()
    return seconds


def per_call(fn, n: int = 2000) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks lock_fence")
    ap.add_argument("--rows", type=int, default=400_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(a.rows, a.dim)).astype(np.float32)
    nfe = rng.integers(10, 99, size=a.rows).astype(np.int32)
    mb = x.nbytes / 1e6
    tmp = Path(tempfile.mkdtemp(prefix="pflatents-fence-"))
    try:
        results: dict[bool, list[float]] = {False: [], True: []}
        table, rec = [], {}
        for r in range(a.repeats):
            for fenced in (r % 2 == 0, r % 2 == 1):
                root = tmp / f"s{r}-{int(fenced)}.zarr"
                results[fenced].append(write_all(root, x, nfe, fenced))
                shutil.rmtree(root)
        for fenced, secs in results.items():
            med = statistics.median(secs)
            what = f"verified `write_shard` over a store of {mb:.0f} MB, {'fenced' if fenced else 'unfenced'}"
            table.append([what, f"{mb / med:.0f} MB/s ({mb / max(secs):.0f}-{mb / min(secs):.0f}, {len(secs)} stores)"])
            rec["fenced_mb_s" if fenced else "unfenced_mb_s"] = [mb / s for s in secs]
        store = open_or_create(str(tmp / "c.zarr"), config={"bench": 1}, n_samples=10, sample_shape=(4,),
                               shard_size=4)
        lock = store_lock(str(tmp / "c.zarr"))
        lock.acquire()
        other = store_lock(str(tmp / "c.zarr"))  # another handle, as a task's store has
        rec["check_us"] = 1e6 * per_call(lambda: other.check(lock.token))
        table.append(["one `check()` of a held lock from another handle", f"{rec['check_us']:.0f} us"])
        lock.release()
        probe = store_lock(str(tmp / "c.zarr"))
        rec["acquire_release_us"] = 1e6 * per_call(lambda: (probe.acquire(), probe.release()), 500)
        table.append(["`acquire()` + `release()`", f"{rec['acquire_release_us']:.0f} us"])
        del store
        print(md_table(["what", "median"], table))
        return rec
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

