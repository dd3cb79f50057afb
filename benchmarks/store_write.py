"""Write throughput of the latent store vs np.save + fsync of the same array.

    .venv/bin/python benchmarks/store_write.py [--rows 1000000] [--dim 64] [--repeats 3]

Every repeat writes fresh files (a new .npy, a new store) and the kinds alternate, because this VM's
speed drifts between minutes and fresh page-cache pages cost more than reused ones. Rows (MB/s,
median over repeats, and the ratio of medians to np.save + fsync; goal >= 0.8):

- np.save of the whole array, then os.fsync (the fair baseline: without fsync np.save only fills the
  page cache);
- store writes: the chunk writes of ``write_shard`` (zstd encode + new chunk files, the store's
  ``write_s`` timings) plus an fsync of every chunk file, so both sides end on disk;
- the same without fsync (what ``write_shard`` does: a SIGKILL cannot lose page-cache data);
- the whole verified ``write_shard`` path: write, read back and decode, bitwise compare with the
  input, crc32c, the "writing" and "done" records (no fsync).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr

from pflatents.storage import default_shard_size, open_or_create


def bench_npsave(x: np.ndarray, d: Path) -> float:
    t0 = time.perf_counter()
    with open(d / "x.npy", "wb") as f:
        np.save(f, x)
        f.flush()
        os.fsync(f.fileno())
    return time.perf_counter() - t0


def fsync_tree(root: Path) -> float:
    t0 = time.perf_counter()
    for p in root.rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    return time.perf_counter() - t0


def bench_store(x: np.ndarray, root: Path, shard: int) -> dict:
    """Seconds: write_shard in total, its chunk writes (write_s), its verification, and an fsync after."""
    n = x.shape[0]
    nfe = np.zeros(n, dtype=np.int32)
    store = open_or_create(str(root), config={"bench": 1}, n_samples=n, sample_shape=x.shape[1:], shard_size=shard)
    write = verify = 0.0
    t0 = time.perf_counter()
    for i in range(store.n_shards):
        i0, i1 = store.shard_range(i)
        rec = store.write_shard(i, x[i0:i1], nfe[i0:i1], {})
        write, verify = write + rec["timings"]["write_s"], verify + rec["timings"]["verify_s"]
    full = time.perf_counter() - t0
    return {"full": full, "write": write, "verify": verify, "fsync": fsync_tree(root / "latents") + fsync_tree(root / "nfe")}


def main() -> None:
    import statistics

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    x = np.random.default_rng(0).standard_normal((a.rows, a.dim), dtype=np.float32)
    mb = x.nbytes / 1e6
    d = Path(tempfile.mkdtemp(prefix="pfl-write-"))
    shard = default_shard_size(4 * a.dim, a.rows)
    t_np, runs = [], []
    try:
        for rep in range(a.repeats):
            t_np.append(bench_npsave(x, d))
            (d / "x.npy").unlink()
            runs.append(bench_store(x, d / f"s{rep}.zarr", shard))
            shutil.rmtree(d / f"s{rep}.zarr")
    finally:
        shutil.rmtree(d, ignore_errors=True)
    med = statistics.median
    base = med(t_np)
    rows = [("np.save + fsync", t_np),
            ("store chunk writes (zstd, new files) + fsync", [r["write"] + r["fsync"] for r in runs]),
            ("store chunk writes (zstd, new files), no fsync", [r["write"] for r in runs]),
            ("store write_shard, verified (write, read back + compare, crc32c, records; no fsync)",
             [r["full"] for r in runs])]
    print(f"{a.rows} x {a.dim} float32 ({mb:.0f} MB), chunks of {shard} rows, median of {a.repeats} alternating runs\n")
    print("| write | MB/s (median) | MB/s (min-max) | ratio to np.save + fsync (medians) |\n|---|---|---|---|")
    for label, ts in rows:
        print(f"| {label} | {mb / med(ts):.0f} | {mb / max(ts):.0f}-{mb / min(ts):.0f} | {base / med(ts):.2f} |")
    v = med([r["verify"] for r in runs])
    print(f"\nverification (read back, decode, compare, crc32c) alone: {mb / v:.0f} MB/s")


if __name__ == "__main__":
    main()
