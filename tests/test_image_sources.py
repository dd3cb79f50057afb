"""The encoded-image sources on real files: image folders, webdataset tar shards, parquet and
``datasets.save_to_disk`` folders. References are independent where one exists: webdataset's own
reader for tar shards, the ``datasets`` library that wrote the parquet/arrow files, PIL for pixels."""

from __future__ import annotations

import io
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pflatents.tasks.data.sources import open_source
from pflatents.tasks.errors import DataError

RNG = np.random.default_rng(17)


def _png(a: np.ndarray, fmt: str = "PNG", mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    im = Image.fromarray(a)
    (im.convert(mode) if mode else im).save(buf, format=fmt)
    return buf.getvalue()


def _scaled(pixels: np.ndarray) -> np.ndarray:
    """uint8 HWC/HW -> what a source returns: CHW float32 k / 127.5 - 1."""
    a = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
    return a.astype(np.float32) / np.float32(127.5) - np.float32(1)


# ---- imagefolder ----------------------------------------------------------------------------


def _folder(root: Path) -> dict[str, np.ndarray]:
    """Two classes, mixed sizes and modes, one corrupt file; returns the RGB pixels of each good file."""
    (root / "cat").mkdir(parents=True)
    (root / "dog" / "puppies").mkdir(parents=True)
    (root / ".hidden").mkdir()
    rgb = {"cat/a.png": RNG.integers(0, 256, (8, 8, 3), dtype=np.uint8),          # RGB, R x R already
           "cat/b.png": RNG.integers(0, 256, (8, 11, 3), dtype=np.uint8),         # wider: crop only
           "dog/c.png": RNG.integers(0, 256, (12, 8), dtype=np.uint8),           # grey, taller
           "dog/puppies/d.png": RNG.integers(0, 256, (8, 9, 4), dtype=np.uint8)}  # RGBA
    for rel, a in rgb.items():
        (root / rel).write_bytes(_png(a))
    (root / "dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / ".hidden" / "x.png").write_bytes(_png(rgb["cat/a.png"]))
    (root / "dog" / "notes.txt").write_text("not an image")
    return rgb


def _crop(a: np.ndarray, r: int) -> np.ndarray:
    """torchvision CenterCrop offsets, for an image whose short side is already r (no resize)."""
    h, w = a.shape[:2]
    top, left = int(round((h - r) / 2.0)), int(round((w - r) / 2.0))
    return a[top:top + r, left:left + r]


def test_imagefolder_corrupt_file_is_named(tmp_path: Path) -> None:
    _folder(tmp_path)
    src = open_source(f"imagefolder:{tmp_path}", resolution=8)
    with pytest.raises(DataError, match=r"(?s)cannot read 1 image\(s\): dog/broken\.jpg \(OSError.*--skip-bad"):
        src.check_finite()
    with pytest.raises(DataError, match=r"dog/broken\.jpg"):
        src.read(0, len(src))


def test_imagefolder_classes_ids_transform_and_skip_list(tmp_path: Path) -> None:
    rgb = _folder(tmp_path)
    src = open_source(f"imagefolder:{tmp_path}", resolution=8, skip_bad=True)
    src.check_finite()  # already scanned: nothing left to refuse
    b = src.read(0, len(src))
    assert list(b.ids) == ["cat/a.png", "cat/b.png", "dog/c.png", "dog/puppies/d.png"]
    assert b.labels.tolist() == [0, 0, 1, 1] and b.labels.dtype == np.int64
    assert src.classes == ["cat", "dog"] and src.sample_shape == (3, 8, 8) and src.quantization == 256
    assert [s[0] for s in src.skipped] == ["dog/broken.jpg"] and src.skipped[0][1].startswith("OSError")
    assert src.pinned()["options"]["skipped"] == src.skipped and src.pinned()["classes"] == ["cat", "dog"]
    # short side already 8: centre crop only, as torchvision's CenterCrop (round((11 - 8) / 2) = 2)
    np.testing.assert_array_equal(b.x[0], _scaled(rgb["cat/a.png"]))
    np.testing.assert_array_equal(b.x[1], _scaled(_crop(rgb["cat/b.png"], 8)))
    assert _crop(rgb["cat/b.png"], 8).shape == (8, 8, 3)
    grey = np.repeat(_crop(rgb["dog/c.png"], 8)[..., None], 3, axis=-1)  # L -> RGB repeats the channel
    np.testing.assert_array_equal(b.x[2], _scaled(grey))
    np.testing.assert_array_equal(b.x[3], _scaled(_crop(rgb["dog/puppies/d.png"][..., :3], 8)))  # alpha dropped
    # reopening with the pinned options gives the same samples without scanning
    again = open_source(src.spec, **src.options)
    assert again.fingerprint() == src.fingerprint() and list(again.ids(0, 4)) == list(b.ids)
    assert pickle.loads(pickle.dumps(src)).read(2, 3).ids.tolist() == ["dog/c.png"]


def test_imagefolder_resize_short_side_then_centre_crop(tmp_path: Path) -> None:
    # a 24 x 16 image of four flat vertical bands: bilinear resize to 12 x 8 keeps flat band interiors
    bands = np.repeat(np.array([10, 80, 160, 240], dtype=np.uint8), 6)[None, :].repeat(16, axis=0)
    (tmp_path / "x.png").write_bytes(_png(bands))
    src = open_source(f"imagefolder:{tmp_path}", resolution=8, channels=1)
    x = src.read(0, 1).x[0, 0]
    want = np.asarray(Image.fromarray(bands).resize((12, 8), Image.Resampling.BILINEAR))[:, 2:10]
    np.testing.assert_array_equal(x, _scaled(want)[0])
    assert (x[:, 5] == np.float32(160) / np.float32(127.5) - np.float32(1)).all()  # a band interior stays flat
    bicubic = open_source(f"imagefolder:{tmp_path}", resolution=8, channels=1, interpolation="bicubic")
    assert bicubic.fingerprint() != src.fingerprint()


def test_imagefolder_modes_to_grey_and_16_bit(tmp_path: Path) -> None:
    g16 = (RNG.integers(0, 65536, (5, 5))).astype(np.uint16)
    Image.fromarray(g16).save(tmp_path / "a16.png")
    rgb = RNG.integers(0, 256, (5, 5, 3), dtype=np.uint8)
    (tmp_path / "b.png").write_bytes(_png(rgb))
    (tmp_path / "c.jpg").write_bytes(_png(rgb, "JPEG", mode="CMYK"))
    src = open_source(f"imagefolder:{tmp_path}", channels=1)
    b = src.read(0, 3)
    assert b.labels is None and src.classes is None and src.sample_shape == (1, 5, 5)
    np.testing.assert_array_equal(b.x[0, 0], _scaled((g16 >> 8).astype(np.uint8))[0])
    np.testing.assert_array_equal(b.x[1, 0], _scaled(np.asarray(Image.fromarray(rgb).convert("L")))[0])
    assert np.isfinite(b.x[2]).all()


def test_imagefolder_size_mismatch_without_resolution(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(_png(np.zeros((4, 4, 3), np.uint8)))
    (tmp_path / "b.png").write_bytes(_png(np.zeros((4, 6, 3), np.uint8)))
    src = open_source(f"imagefolder:{tmp_path}")
    with pytest.raises(DataError, match=r"b\.png decodes to 6x4 .* a\.png .* --resolution"):
        src.check_finite()


def test_imagefolder_refusals(tmp_path: Path) -> None:
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.png").write_bytes(_png(np.zeros((4, 4), np.uint8)))
    (tmp_path / "loose.png").write_bytes(_png(np.zeros((4, 4), np.uint8)))
    with pytest.raises(DataError, match=r"both directly in .*loose\.png.*c/a\.png"):
        open_source(f"imagefolder:{tmp_path}")
    with pytest.raises(DataError, match="image folder not found"):
        open_source(f"imagefolder:{tmp_path / 'nope'}")
    with pytest.raises(DataError, match="channels must be 1"):
        open_source(f"imagefolder:{tmp_path / 'c'}", channels=2)
    with pytest.raises(DataError, match=r"--resolution does not apply to sklearn:digits data \(only to imagefolder:DIR, parquet:PATH, wds:PATTERN\)"):
        open_source("sklearn:digits", resolution=8)


def test_imagefolder_fingerprint_covers_labels_and_ids(tmp_path: Path) -> None:
    a = tmp_path / "a"
    for cls in ("x", "y"):
        (a / cls).mkdir(parents=True)
    for i in range(3):
        (a / "x" / f"{i}.png").write_bytes(_png(np.full((4, 4), 40 * i, np.uint8)))
    (a / "y" / "9.png").write_bytes(_png(np.full((4, 4), 200, np.uint8)))
    f0 = open_source(f"imagefolder:{a}").fingerprint()
    shutil.copytree(a, tmp_path / "b")
    assert open_source(f"imagefolder:{tmp_path / 'b'}").fingerprint() == f0
    # same bytes in the same order, one file now in the other class: only its label changed
    (tmp_path / "b" / "y" / "2.png").write_bytes((tmp_path / "b" / "x" / "2.png").read_bytes())
    (tmp_path / "b" / "x" / "2.png").unlink()
    moved = open_source(f"imagefolder:{tmp_path / 'b'}")
    assert moved.read(0, 4).labels.tolist() == [0, 0, 1, 1]
    assert moved.fingerprint() != f0


# ---- webdataset -----------------------------------------------------------------------------


def _shards(root: Path, n_shards: int = 3, per: int = 4, gz_last: bool = False) -> list[dict]:
    """Write shards with webdataset's TarWriter: a png, a jpg and a cls per sample; returns the samples."""
    import webdataset as wds

    samples = []
    for k in range(n_shards):
        name = root / (f"shard-{k:02d}.tar" + (".gz" if gz_last and k == n_shards - 1 else ""))
        with wds.TarWriter(str(name)) as w:
            for i in range(per):
                ramp = np.add.outer(np.arange(6), np.arange(6))[..., None] * np.array([9, 5, 2])
                a = (ramp + 20 * (k * per + i)).clip(0, 255).astype(np.uint8)  # smooth: JPEG keeps it close
                s = {"__key__": f"{k:02d}/sample{i:03d}", "png": _png(a), "jpg": _png(a, "JPEG"), "cls": (3 * k + i) % 5}
                if (k, i) == (1, 2):
                    del s["cls"]
                w.write(s)
                samples.append({**s, "pixels": a})
    return samples


def test_wds_matches_webdatasets_own_reader(tmp_path: Path) -> None:
    import webdataset as wds

    samples = _shards(tmp_path, gz_last=True)
    pattern = str(tmp_path / "shard-{00..01}.tar")
    urls = [pattern, str(tmp_path / "shard-02.tar.gz")]
    src = open_source(f"wds:{{{','.join(urls)}}}")  # nested braces: {shard-{00..01}.tar,shard-02.tar.gz}
    assert len(src) == 12 and src.sample_shape == (3, 6, 6) and src.options["image_key"] == "png"
    ref = list(wds.WebDataset(urls[0], shardshuffle=False)) + list(wds.WebDataset(urls[1], shardshuffle=False))
    b = src.read(0, 12)
    assert list(b.ids) == [r["__key__"] for r in ref] == [s["__key__"] for s in samples]
    want = [int(r["cls"]) if "cls" in r else -1 for r in ref]
    assert b.labels.tolist() == want and want[6] == -1
    for i in range(12):
        np.testing.assert_array_equal(b.x[i], _scaled(samples[i]["pixels"]))
    part = src.read(3, 9)  # across two shard boundaries
    np.testing.assert_array_equal(part.x, b.x[3:9])
    assert list(part.ids) == list(b.ids[3:9])
    jpg = open_source(f"wds:{pattern}", image_key="jpg")
    assert 0 < np.abs(jpg.read(0, 8).x - b.x[:8]).mean() < 0.05 and jpg.fingerprint() != src.fingerprint()
    assert open_source(f"wds:file://{pattern}").read(0, 8).ids.tolist() == list(b.ids[:8])


def test_wds_fingerprint_and_errors(tmp_path: Path) -> None:
    _shards(tmp_path, n_shards=2)
    spec = f"wds:{tmp_path}/shard-{{00..01}}.tar"
    f0 = open_source(spec).fingerprint()
    assert open_source(spec).fingerprint() == f0
    assert open_source(spec, label_key="").read(0, 2).labels is None
    with pytest.raises(DataError, match=r"shard not found: .*shard-02\.tar"):
        open_source(f"wds:{tmp_path}/shard-{{00..02}}.tar")
    with pytest.raises(DataError, match=r"no 'webp' member"):
        src = open_source(spec, image_key="webp")
        src.check_finite()


# ---- parquet / datasets ---------------------------------------------------------------------


def _hf_dataset(n: int = 6):
    import datasets

    pixels = [RNG.integers(0, 256, (5, 5, 3), dtype=np.uint8) for _ in range(n)]
    ds = datasets.Dataset.from_dict({"image": [Image.fromarray(p) for p in pixels], "label": [i % 3 for i in range(n)],
                                     "name": [f"img{i}" for i in range(n)]})
    ds = ds.cast_column("label", datasets.ClassLabel(names=["ant", "bee", "cow"]))
    return ds, pixels


def test_parquet_file_folder_and_save_to_disk(tmp_path: Path) -> None:
    ds, pixels = _hf_dataset()
    ds.save_to_disk(str(tmp_path / "hf"))
    (tmp_path / "pq").mkdir()
    ds.select(range(4)).to_parquet(str(tmp_path / "pq" / "a.parquet"))
    ds.select(range(4, 6)).to_parquet(str(tmp_path / "pq" / "b.parquet"))
    hf = open_source(f"parquet:{tmp_path / 'hf'}")
    folder = open_source(f"parquet:{tmp_path / 'pq'}")
    single = open_source(f"parquet:{tmp_path / 'pq' / 'a.parquet'}")
    for src, n in ((hf, 6), (folder, 6), (single, 4)):
        b = src.read(0, n)
        assert b.labels.tolist() == ds["label"][:n] and src.classes == ["ant", "bee", "cow"]
        for i in range(n):
            np.testing.assert_array_equal(b.x[i], _scaled(pixels[i]))
    assert folder.read(3, 5).ids.tolist() == ["a.parquet:3", "b.parquet:0"]
    assert hf.ids(0, 1)[0] == "data-00000-of-00001.arrow:0"
    named = open_source(f"parquet:{tmp_path / 'hf'}", id_column="name")
    assert named.read(0, 6).ids.tolist() == ds["name"] and named.fingerprint() != hf.fingerprint()
    assert hf.fingerprint() == open_source(f"parquet:{tmp_path / 'hf'}").fingerprint()


def test_parquet_raw_bytes_paths_and_errors(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pixels = [RNG.integers(0, 256, (4, 4), dtype=np.uint8) for _ in range(3)]
    (tmp_path / "imgs").mkdir()
    for i, p in enumerate(pixels):
        (tmp_path / "imgs" / f"{i}.png").write_bytes(_png(p))
    pq.write_table(pa.table({"img": [_png(p) for p in pixels], "y": [2, None, 0]}), tmp_path / "raw.parquet")
    pq.write_table(pa.table({"img": [f"imgs/{i}.png" for i in range(3)]}), tmp_path / "paths.parquet")
    raw = open_source(f"parquet:{tmp_path / 'raw.parquet'}", label_column="y", channels=1)
    b = raw.read(0, 3)
    assert b.labels.tolist() == [2, -1, 0] and raw.options["image_column"] == "img"
    by_path = open_source(f"parquet:{tmp_path / 'paths.parquet'}", channels=1)
    assert by_path.read(0, 3).labels is None
    np.testing.assert_array_equal(by_path.read(0, 3).x, b.x)
    np.testing.assert_array_equal(b.x[1, 0], _scaled(pixels[1])[0])
    with pytest.raises(DataError, match=r"no column 'lbl' \(--label-column\); columns: img, y"):
        open_source(f"parquet:{tmp_path / 'raw.parquet'}", label_column="lbl")
    ds, _ = _hf_dataset(3)
    import datasets

    datasets.DatasetDict({"train": ds, "test": ds}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match=r"DatasetDict folder; name one split's folder, e.g. parquet:.*dd/train"):
        open_source(f"parquet:{tmp_path / 'dd'}")
    assert len(open_source(f"parquet:{tmp_path / 'dd' / 'test'}")) == 3
