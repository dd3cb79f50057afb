"""Write throughput of the latent store (write + read-back verification + record) vs np.save + fsync.

    .venv/bin/python benchmarks/store_write.py [--rows 1000000] [--dim 64]

Prints MB/s for: np.save of the whole array with os.fsync (the fair baseline: without fsync np.save
only fills the page cache), the store's write_shard over all shards (default 8 MiB chunks: zstd
write of latents and nfe into new chunk files, read back and decode, bitwise compare with the
input, crc32c, "writing" and "done" records; no fsync), and the store's raw chunk writes without
verification or records (overwriting the chunks just written; no fsync), plus the ratios (goal >= 0.8).
Timings on shared or virtualised machines vary a lot from run to run: repeat and report the spread.
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

from storage import default_shard_size, open_or_create


def bench_npsave(x: np.ndarray, d: Path) -> float:
    t0 = time.perf_counter()
    with open(d / "x.npy", "wb") as f:
        np.save(f, x)
        f.flush()
        os.fsync(f.fileno())
    return time.perf_counter() - t0


def bench_store(x: np.ndarray, d: Path, shard: int) -> tuple[float, float]:
    """(seconds through write_shard incl. verification and records, seconds of the raw array writes)."""
    n = x.shape[0]
    nfe = np.zeros(n, dtype=np.int32)
    store = open_or_create(str(d / "s.zarr"), config={"bench": 1}, n_samples=n, sample_shape=x.shape[1:],
                           shard_size=shard)
    t0 = time.perf_counter()
    for i in range(store.n_shards):
        i0, i1 = store.shard_range(i)
        store.write_shard(i, x[i0:i1], nfe[i0:i1], {})
    full = time.perf_counter() - t0
    raw_arr = zarr.open_group(str(d / "s.zarr"), mode="r+")["latents"]
    t0 = time.perf_counter()
    for i0 in range(0, n, shard):
        raw_arr[i0:i0 + shard] = x[i0:i0 + shard]
    raw = time.perf_counter() - t0
    return full, raw


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=64)
    a = ap.parse_args()
    x = np.random.default_rng(0).standard_normal((a.rows, a.dim), dtype=np.float32)
    mb = x.nbytes / 1e6
    d = Path(tempfile.mkdtemp(prefix="pfl-write-"))
    try:
        shard = default_shard_size(4 * a.dim, a.rows)
        t_np = bench_npsave(x, d)
        t_full, t_raw = bench_store(x, d, shard)
    finally:
        shutil.rmtree(d, ignore_errors=True)
    print(f"| {a.rows} x {a.dim} float32 ({mb:.0f} MB), chunks of {shard} rows | MB/s | ratio to np.save+fsync |")
    print("|---|---|---|")
    rows = [("np.save + fsync", t_np),
            ("store write_shard (new chunks; write, read-back + compare, crc32c, records; no fsync)",
             t_full),
            ("store raw chunk writes (zstd, overwrite; no verify, no records, no fsync)", t_raw)]
    for label, t in rows:
        print(f"| {label} | {mb / t:.0f} | {t_np / t:.2f} |")


if __name__ == "__main__":
    main()
