"""Read throughput of the image sources: an image folder, webdataset tar shards and a parquet file of the
same JPEG images, read through ``--resolution`` as a shard task reads them, plus what opening costs
(indexing, and the decode-everything scan of ``--skip-bad`` / the pre-run check).

    .venv/bin/python -m benchmarks sources [--n 2000] [--size 256] [--res 64]

Prints a Markdown table: seconds and images/s for open, the full scan, and reads of 512-image shards.
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def _jpeg(rng: np.random.Generator, size: int) -> bytes:
    """A smooth random picture (a few blobs): realistic JPEG sizes, not noise."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    img = np.zeros((size, size, 3))
    for _ in range(4):
        cx, cy, w = rng.uniform(0, 1, 3)
        img += rng.uniform(0, 255, 3) * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (0.05 + 0.2 * w))[..., None]
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _write(root: Path, n: int, size: int) -> dict[str, str]:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import webdataset as wds

    rng = np.random.default_rng(0)
    blobs = [_jpeg(rng, size) for _ in range(n)]
    for i, b in enumerate(blobs):
        d = root / "folder" / f"class{i % 10}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{i:06d}.jpg").write_bytes(b)
    per = 500
    for k in range(0, n, per):
        with wds.TarWriter(str(root / f"shard-{k // per:04d}.tar")) as w:
            for i in range(k, min(n, k + per)):
                w.write({"__key__": f"{i:06d}", "jpg": blobs[i], "cls": i % 10})
    pq.write_table(pa.table({"image": [{"bytes": b, "path": None} for b in blobs], "label": [i % 10 for i in range(n)]}),
                   root / "data.parquet", row_group_size=256)
    last = (n - 1) // per
    return {"imagefolder": f"imagefolder:{root / 'folder'}", "wds": f"wds:{root}/shard-{{0000..{last:04d}}}.tar",
            "parquet": f"parquet:{root / 'data.parquet'}"}


def main(argv: list[str] | None = None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks sources")
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--res", type=int, default=64)
    a = ap.parse_args(argv)
    from pflatents.tasks.data.sources import open_source

    with tempfile.TemporaryDirectory() as tmp:
        specs = _write(Path(tmp), a.n, a.size)
        print(f"{a.n} JPEG images of {a.size}x{a.size} (smooth pictures, quality 90), --resolution {a.res}, RGB\n")
        print("| source | open s | scan (decode all) s | scan images/s | read 512-image shards images/s |")
        print("|---|---|---|---|---|")
        rows = []
        for name, spec in specs.items():
            t0 = time.perf_counter()
            src = open_source(spec, resolution=a.res)
            t1 = time.perf_counter()
            src.check_finite()
            t2 = time.perf_counter()
            for i0 in range(0, len(src), 512):
                src.read(i0, min(len(src), i0 + 512))
            t3 = time.perf_counter()
            print(f"| {name} | {t1 - t0:.2f} | {t2 - t1:.2f} | {a.n / (t2 - t1):.0f} | {a.n / (t3 - t2):.0f} |")
            rows.append(dict(source=name, open_s=t1 - t0, scan_s=t2 - t1, scan_per_s=a.n / (t2 - t1),
                             read_per_s=a.n / (t3 - t2), n=len(src)))
    return rows

