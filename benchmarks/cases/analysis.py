"""Analysis at scale: wall time and peak RSS of `pflatents analyze` vs an in-memory numpy computation.

Writes an N x D store of N(0, I) float32 latents directly with storage (generated shard by shard,
never whole), then measures, each in a fresh subprocess under ``/usr/bin/time`` (peak RSS = max
resident set of that process):

- ``analyze CLI``: ``pflatents analyze STORE --json`` (no reconstruction), Prefect start-up included;
- ``stats pass``: the same one-pass dask statistics + dCor without Prefect (``--measure stats``);
- ``numpy in-memory``: the whole array loaded as float64 and the same statistics computed with
  numpy/scipy on it (``--measure numpy``), checked against the dask results;
- ``stats pass`` again on a store with ``--scale`` x the rows: its peak RSS must stay flat.

With ``--with-data`` the store's pinned data is a real ``.npy`` (the latents' values, so the data
can be read): the statistics task then also makes its pass over the data (covariance spectrum, the
true prior p_T) and tests the latents in p_T-standardised coordinates, as ``analyze`` does on real
stores. Without it the data spec cannot be opened and the latents are tested against N(0, I).

Usage::

    python -m benchmarks analysis                       # 2,000,000 x 64, and 4x rows for the flat-RSS check
    python -m benchmarks analysis --rows 200000 --scale 2   # smoke run
    python -m benchmarks analysis --skip-numpy --skip-cli   # out-of-core figures only

A Markdown table goes to stdout, progress to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def make_store(path: Path, rows: int, dims: int, seed: int = 0, with_data: bool = False) -> None:
    """An N(0, I) float32 store written shard by shard (memory ~ one shard); with ``with_data`` the
    same values also as ``<path>.npy``, pinned as the store's data."""
    from pflatents.storage import LatentStore, default_shard_size
    from pflatents.tasks.ode.pfode import SolverConfig
    from pflatents.tasks.ode.sde import VPSDE

    shard = default_shard_size(4 * dims, rows)
    data = {"spec": "benchmark:none", "n_samples": rows, "sample_shape": [dims], "dtype": "float32"}
    if with_data:
        npy = np.lib.format.open_memmap(str(path) + ".npy", mode="w+", dtype=np.float32, shape=(rows, dims))
        for i0 in range(0, rows, shard):
            i1 = min(i0 + shard, rows)
            npy[i0:i1] = np.random.default_rng([seed, i0 // shard]).standard_normal((i1 - i0, dims), dtype=np.float32)
        npy.flush()
        del npy
        from pflatents.tasks.data.sources import open_source

        data = {"spec": str(path) + ".npy", "n_samples": rows, "sample_shape": [dims], "dtype": "float32",
                "fingerprint": open_source(str(path) + ".npy").fingerprint()}
    config = {"data": data,
              "model": {"spec": "benchmark:none", "kind": "none", "content_hash": "none", "dim": dims}, "sde": VPSDE().to_dict(), "solver": SolverConfig().to_dict(),
              "shard_size": shard, "batch_size": 1024, "dtype": "float32"}
    store = LatentStore.create(str(path), config=config, n_samples=rows, sample_shape=(dims,), shard_size=shard)
    for sid in range(store.n_shards):
        i0, i1 = store.shard_range(sid)
        z = np.random.default_rng([seed, sid]).standard_normal((i1 - i0, dims), dtype=np.float32)
        store.write_shard(sid, z, np.zeros(i1 - i0, np.int32))


def measure_stats(store_url: str) -> dict:
    """The analyze statistics task body (one dask pass + dCor), no Prefect."""
    from pflatents.storage import LatentStore
    from pflatents.storage.analysis import done_ranges
    from pflatents.tasks.wrappers.analyze import compute_latent_stats
    from pflatents.tasks.analysis.stats import StatsConfig

    store = LatentStore.open(store_url, mode="r+")
    ranges = [list(r) for r in done_ranges(store, False)]
    s = compute_latent_stats.fn(store_url, ranges, StatsConfig().to_dict(), 1.0)
    return {"target": s["prior_target"]["target"][:3], "rank": (s.get("data") or {}).get("rank"),"max_abs_offdiag_corr": s["independence"]["max_abs_offdiag_corr"],
            "max_abs_offdiag_corr_of_squares": s["independence"]["max_abs_offdiag_corr_of_squares"],
            "mean_abs_excess_kurtosis": s["normality"]["mean_abs_excess_kurtosis"],
            "max_ks": s["normality"]["max_ks"], "max_ad": s["normality"]["max_ad"]}


def measure_numpy(store_url: str) -> dict:
    """The same statistics on the whole array in memory (numpy/scipy, float64)."""
    import zarr
    from scipy import special, stats

    from pflatents.tasks.analysis.stats import StatsConfig, make_plan, rff_features

    x = np.asarray(zarr.open_group(store_url, mode="r")["latents"][:], dtype=np.float64)
    n, d = x.shape
    cfg = StatsConfig()
    plan = make_plan(d, cfg)
    skew, kurt = stats.skew(x), stats.kurtosis(x)
    stats.jarque_bera(x, axis=0)
    corr = [np.corrcoef(f.T) for f in (x, x * x, np.abs(x))]
    np.linalg.slogdet(corr[0])
    xs = np.sort(x, axis=0)
    ks = np.max(np.maximum(np.arange(1, n + 1)[:, None] / n - special.ndtr(xs),
                           special.ndtr(xs) - np.arange(n)[:, None] / n), axis=0)
    i = np.arange(1, n + 1)[:, None]
    ad = -n - ((2 * i - 1) * special.log_ndtr(xs) + (2 * (n - i) + 1) * special.log_ndtr(-xs)).sum(0) / n
    del xs
    f = rff_features(x, plan.freqs)
    f -= f.mean(0)
    (f.T @ f) / n
    del f
    cells = np.minimum((special.ndtr(x) * cfg.mi_bins).astype(np.int64), cfg.mi_bins - 1)
    onehot = np.zeros((n, d * cfg.mi_bins), np.float32)
    onehot[np.arange(n)[:, None], cells + cfg.mi_bins * np.arange(d)] = 1
    onehot.T @ onehot
    return {"max_abs_offdiag_corr": float(np.abs(corr[0] - np.eye(d)).max()),
            "max_abs_offdiag_corr_of_squares": float(np.abs(corr[1] - np.eye(d)).max()),
            "mean_abs_excess_kurtosis": float(np.abs(kurt).mean()), "max_ks": float(ks.max()),
            "max_ad": float(ad.max())}


def timed(cmd: list[str], env: dict | None = None) -> tuple[float, float, str]:
    """Run under /usr/bin/time: (wall s, peak RSS MiB, stdout)."""
    fd, tfile = tempfile.mkstemp()
    os.close(fd)
    t0 = time.perf_counter()
    out = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", tfile, *cmd], capture_output=True, text=True,
                         env=env, cwd=ROOT)
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        raise RuntimeError(f"{cmd} failed:\n{out.stderr[-3000:]}")
    rss = int(Path(tfile).read_text().split()[-1]) / 1024
    os.unlink(tfile)
    return wall, rss, out.stdout


def run(args: argparse.Namespace) -> list[dict]:
    work = Path(args.dir or tempfile.mkdtemp(prefix="pflatents-bench-"))
    env = {**os.environ, "PREFECT_HOME": str(work / "prefect"), "PREFECT_LOGGING_LEVEL": "ERROR"}
    me = [sys.executable, "-m", "benchmarks.cases.analysis"]  # run from ROOT (timed's cwd)
    rows_out = []
    sizes = [args.rows] + ([args.rows * args.scale] if args.scale > 1 else [])
    for k, rows in enumerate(sizes):
        store = work / f"store_{rows}{'_data' if args.with_data else ''}.zarr"
        if not store.exists():
            t0 = time.perf_counter()
            make_store(store, rows, args.dims, with_data=args.with_data)
            log(f"wrote {rows} x {args.dims} in {time.perf_counter() - t0:.1f} s")
        gb = rows * args.dims * 4 / 1e9
        wall, rss, out = timed([*me, "--measure", "stats", "--store", str(store)], env)
        stats_res = json.loads(out.strip().splitlines()[-1])
        label = "stats pass, data read (spectrum, p_T)" if args.with_data else "stats pass (dask, out of core)"
        rows_out.append((label, rows, gb, wall, rss))
        log(f"stats pass {rows}: {wall:.1f} s, {rss:.0f} MiB")
        if k == 0 and not args.skip_cli:
            wall, rss, _ = timed([str(BIN / "pflatents"), "analyze", str(store), "--json", "--overwrite"], env)
            rows_out.append(("analyze CLI (incl. Prefect start)", rows, gb, wall, rss))
            log(f"analyze CLI {rows}: {wall:.1f} s, {rss:.0f} MiB")
        if k == 0 and not args.skip_numpy:
            wall, rss, out = timed([*me, "--measure", "numpy", "--store", str(store)], env)
            ref = json.loads(out.strip().splitlines()[-1])
            rows_out.append(("numpy/scipy in memory", rows, gb, wall, rss))
            diff = {key: abs(stats_res[key] - ref[key]) / max(abs(ref[key]), 1e-300) for key in ref
                    if not args.with_data}
            log(f"numpy in memory {rows}: {wall:.1f} s, {rss:.0f} MiB; relative differences {diff}")
    print(f"\n| computation | rows x {args.dims} | GB (float32) | wall s | peak RSS MiB |\n|---|---|---|---|---|")
    for name, rows, gb, wall, rss in rows_out:
        print(f"| {name} | {rows:,} | {gb:.2f} | {wall:.1f} | {rss:.0f} |")
    if not args.keep and not args.dir:
        shutil.rmtree(work, ignore_errors=True)
    return [dict(computation=name, rows=rows, gb=gb, wall_s=wall, peak_rss_mib=rss)
            for name, rows, gb, wall, rss in rows_out]


def main(argv: list[str] | None = None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks analysis", description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=2_000_000)
    ap.add_argument("--dims", type=int, default=64)
    ap.add_argument("--scale", type=int, default=4, help="rows multiplier of the flat-RSS check (1: skip)")
    ap.add_argument("--dir", default=None, help="work directory (kept); default a temp dir, removed")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--skip-numpy", action="store_true")
    ap.add_argument("--skip-cli", action="store_true")
    ap.add_argument("--with-data", action="store_true", help="pin a readable .npy as the data (the data pass runs)")
    ap.add_argument("--measure", choices=["stats", "numpy"], help=argparse.SUPPRESS)
    ap.add_argument("--store", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.measure:
        fn = measure_stats if args.measure == "stats" else measure_numpy
        print(json.dumps(fn(args.store)))
        return
    return run(args)


if __name__ == "__main__":  # the --measure subprocesses run this module
    main()
