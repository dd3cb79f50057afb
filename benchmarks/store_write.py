"""Write throughput of the latent store (write + read-back verification + record) vs np.save + fsync.

    .venv/bin/python benchmarks/store_write.py [--rows 1000000] [--dim 64]

Prints MB/s for: np.save of the whole array with os.fsync (the fair baseline: without fsync np.save
only fills the page cache), the store's write_shard over all shards (default 8 MiB chunks), and the
store's raw chunk writes without verification, plus the ratios (goal >= 0.8).
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
    print(f"| np.save + fsync | {mb / t_np:.0f} | 1.00 |")
    print(f"| store write_shard (write, read-back verify, record) | {mb / t_full:.0f} | {t_np / t_full:.2f} |")
    print(f"| store raw chunk writes (zstd) | {mb / t_raw:.0f} | {t_np / t_raw:.2f} |")


if __name__ == "__main__":
    main()
