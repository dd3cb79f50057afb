"""Dataset sources: each kind on real files, fingerprints, NaN/Inf scans and input errors."""

from __future__ import annotations

import pickle
import shutil
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import zarr
from PIL import Image

from pflatents.tasks.errors import DataError
from pflatents.tasks.data.sources import ImageSource, NpySource, open_source


def _save(path: Path, x: np.ndarray) -> str:
    """Save ``x`` as .npy and return the path as a spec."""
    np.save(path, x)
    return str(path)


# ---- .npy -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("stored", "read"), [("float32", "float32"), ("float64", "float64"),
                                              ("float16", "float32"), (">f4", "float32")])
def test_npy_reads_a_range(tmp_path: Path, stored: str, read: str) -> None:
    x = np.random.default_rng(0).normal(size=(1000, 16)).astype(stored)
    src = open_source(_save(tmp_path / "x.npy", x))
    block = src.read(10, 25).x
    assert isinstance(src, NpySource) and len(src) == 1000 and src.sample_shape == (16,)
    assert src.dtype == np.dtype(read) and block.dtype == np.dtype(read)
    assert type(block) is np.ndarray and block.flags.c_contiguous
    np.testing.assert_array_equal(block, x[10:25].astype(read))
    assert src.read(7, 7).x.shape == (0, 16) and src.quantization is None


def test_npy_is_memory_mapped_never_loaded_whole(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "big.npy"
    big = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(1 << 21, 64))
    big[123_456] = 7.0  # 512 MiB, sparse on disk
    big.flush()
    del big
    calls: list[dict] = []
    real_load = np.load
    monkeypatch.setattr(np, "load", lambda *a, **k: calls.append(k) or real_load(*a, **k))
    tracemalloc.start()
    src = open_source(str(path))
    row = src.read(123_456, 123_457).x
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert calls and all(k.get("mmap_mode") == "r" for k in calls)
    assert peak < 8 << 20, f"opening and reading one row allocated {peak / 2**20:.0f} MiB"
    assert (row == 7.0).all() and len(src) == 1 << 21


def test_fingerprint_hashes_every_value_of_small_files(tmp_path: Path) -> None:
    x = np.random.default_rng(1).normal(size=(5000, 64)).astype(np.float32)  # 1.2 MiB
    a = open_source(_save(tmp_path / "a.npy", x))
    twin = open_source(_save(tmp_path / "twin.npy", x))
    f0 = a.fingerprint()
    assert f0 == twin.fingerprint()  # content hash, independent of the file name
    for row in (0, 1777, 2500, 4999):
        y = x.copy()
        y[row, 5] += 1e-3
        assert open_source(_save(tmp_path / "b.npy", y)).fingerprint() != f0, row


def test_fingerprint_samples_blocks_of_big_files(tmp_path: Path) -> None:
    path = tmp_path / "big.npy"
    n = 1 << 20  # 1 Mi x 64 float32 = 256 MiB > hash_full_bytes: sampled regime
    np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, 64)).flush()
    src = open_source(str(path))
    ranges = src._hash_ranges()
    assert sum(b - a for a, b in ranges) * src.sample_nbytes <= 40 << 20  # cheap: ~36 MiB read
    f0 = src.fingerprint()

    def poke(row: int) -> str:
        m = np.load(path, mmap_mode="r+")
        m[row, 3] += 1.0
        m.flush()
        del m
        return open_source(str(path)).fingerprint()

    assert poke(n // 2) != f0  # the middle block is always sampled
    assert poke(n - 1) != f0
    unsampled = ranges[0][1] + 1000
    assert all(not a <= unsampled < b for a, b in ranges)
    f1 = open_source(str(path)).fingerprint()
    assert poke(unsampled) == f1  # documented limit of sampling: between blocks goes unseen


def test_fingerprint_full_threshold_is_tunable(tmp_path: Path) -> None:
    x = np.zeros((4096, 64), dtype=np.float32)  # 1 MiB
    src = open_source(_save(tmp_path / "x.npy", x))
    src.hash_full_bytes, src.hash_block_bytes, src.hash_blocks = 1 << 16, 1 << 12, 5
    assert len(src._hash_ranges()) == 5 and src._hash_ranges()[-1][1] == 4096


# ---- zarr -----------------------------------------------------------------------------------


def test_zarr_array_inside_a_group(tmp_path: Path) -> None:
    x = np.random.default_rng(2).normal(size=(50, 3, 4, 4))
    group = zarr.open_group(tmp_path / "d.zarr", mode="w", zarr_format=3)
    group.create_array("data/train", data=x, chunks=(7, 3, 4, 4))
    src = open_source(f"{tmp_path}/d.zarr/data/train")
    assert len(src) == 50 and src.sample_shape == (3, 4, 4) and src.dtype == np.float64
    np.testing.assert_array_equal(src.read(5, 20).x, x[5:20])
    with pytest.raises(DataError, match=r"d\.zarr is a zarr group, not an array.*data/train"):
        open_source(f"{tmp_path}/d.zarr")
    with pytest.raises(DataError, match="no array 'data/test'"):
        open_source(f"{tmp_path}/d.zarr/data/test")


@pytest.mark.parametrize("fmt", [2, 3])
def test_zarr_bare_array_store(tmp_path: Path, fmt: int) -> None:
    x = np.arange(40, dtype=np.float32).reshape(10, 4)
    zarr.create_array(tmp_path / "a.zarr", data=x, chunks=(3, 4), zarr_format=fmt)
    src = open_source(str(tmp_path / "a.zarr"))
    np.testing.assert_array_equal(src.read(2, 9).x, x[2:9])
    assert src.fingerprint() == open_source(_save(tmp_path / "a.npy", x)).fingerprint()


def test_zarr_integer_array_refused(tmp_path: Path) -> None:
    zarr.create_array(tmp_path / "i.zarr", data=np.zeros((5, 3), dtype=np.int16))
    with pytest.raises(DataError, match="int16 is not accepted: float data"):
        open_source(str(tmp_path / "i.zarr"))


# ---- images ---------------------------------------------------------------------------------


def _image(path: Path, pixels: np.ndarray) -> None:
    """Write ``pixels`` (HW or HWC uint8) as an image file."""
    Image.fromarray(pixels).save(path)


def test_grayscale_pngs_sorted_scaled_chw(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    pixels = {name: rng.integers(0, 256, size=(4, 6), dtype=np.uint8)
              for name in ("c.png", "a.png", "b.PNG")}
    for name, p in pixels.items():
        _image(tmp_path / name, p)
    (tmp_path / "notes.txt").write_text("not an image")
    src = open_source(f"images:{tmp_path}")
    x = src.read(0, 3).x
    assert isinstance(src, ImageSource) and src.sample_shape == (1, 4, 6)
    assert x.shape == (3, 1, 4, 6) and x.dtype == np.float32 and src.quantization == 256
    for i, name in enumerate(["a.png", "b.PNG", "c.png"]):
        np.testing.assert_array_equal(x[i, 0], pixels[name] / np.float32(127.5) - 1)
    assert x.min() >= -1 and x.max() <= 1


def test_rgb_images_and_jpeg(tmp_path: Path) -> None:
    ramp = np.add.outer(np.arange(5) * 20, np.arange(7) * 10)
    rgb = np.stack([ramp, 200 - ramp, np.full_like(ramp, 90)], axis=-1).astype(np.uint8)
    _image(tmp_path / "0.png", rgb)
    _image(tmp_path / "1.jpg", rgb)
    src = open_source(f"images:{tmp_path}")
    x = src.read(0, 2).x
    assert src.sample_shape == (3, 5, 7) and x.shape == (2, 3, 5, 7)
    np.testing.assert_array_equal(x[0], rgb.transpose(2, 0, 1) / np.float32(127.5) - 1)
    assert np.abs(x[1] - x[0]).mean() < 0.05  # lossy JPEG of the same smooth picture


def test_odd_size_image_named(tmp_path: Path) -> None:
    for i in range(3):
        _image(tmp_path / f"{i}.png", np.zeros((8, 8), dtype=np.uint8))
    _image(tmp_path / "2b.png", np.zeros((9, 8), dtype=np.uint8))
    with pytest.raises(DataError, match=r"2b\.png is 8x9 pixels, but 0\.png .* are 8x8"):
        open_source(f"images:{tmp_path}")


def test_mixed_gray_and_rgb_refused(tmp_path: Path) -> None:
    _image(tmp_path / "a.png", np.zeros((8, 8), dtype=np.uint8))
    _image(tmp_path / "b.png", np.zeros((8, 8, 3), dtype=np.uint8))
    with pytest.raises(DataError, match=r"b\.png has 3 channel"):
        open_source(f"images:{tmp_path}")


def test_image_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="image directory not found"):
        open_source(f"images:{tmp_path / 'missing'}")
    (tmp_path / "x.txt").write_text("")
    with pytest.raises(DataError, match="no PNG/JPEG images in"):
        open_source(f"images:{tmp_path}")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"cannot read image .*bad\.png"):
        open_source(f"images:{tmp_path}")


# ---- sklearn digits -------------------------------------------------------------------------


def test_sklearn_digits() -> None:
    src = open_source("sklearn:digits")
    x = src.read(0, len(src)).x
    assert len(src) == 1797 and src.sample_shape == (64,) and x.dtype == np.float32
    assert x.min() == -1.0 and x.max() == 1.0 and src.quantization == 17
    levels = (x + 1) * 8
    np.testing.assert_array_equal(levels, np.round(levels))  # exactly on the 17-level grid


# ---- checks and errors ----------------------------------------------------------------------


def test_check_finite_lists_first_bad_indices(tmp_path: Path) -> None:
    x = np.zeros((1000, 8), dtype=np.float32)
    open_source(_save(tmp_path / "ok.npy", x)).check_finite(block=64)
    x[3, 1], x[17, 0], x[500, 7] = np.nan, np.inf, -np.inf
    with pytest.raises(DataError, match=r"NaN or Inf in 3 samples, first at indices 3, 17, 500"):
        open_source(_save(tmp_path / "bad.npy", x)).check_finite(block=64)
    x[100:130] = np.nan
    with pytest.raises(DataError, match=r"in 33 samples.* 3, 17, 100, 101, 102, 103, 104, 105, "
                                        r"106, 107\n"):
        open_source(_save(tmp_path / "bad.npy", x)).check_finite(block=64)


@pytest.mark.parametrize("dtype", ["int64", "uint8", "bool"])
def test_integer_npy_refused(tmp_path: Path, dtype: str) -> None:
    spec = _save(tmp_path / "i.npy", np.zeros((4, 3), dtype=dtype))
    with pytest.raises(DataError, match=rf"dtype {dtype} is not accepted: float data.*\n.*images"):
        open_source(spec)


@pytest.mark.parametrize(("shape", "message"), [((0, 8), "is empty"), ((5,), "no sample axis"),
                                                ((4, 0), "hold no values")])
def test_bad_shapes_refused(tmp_path: Path, shape: tuple, message: str) -> None:
    spec = _save(tmp_path / "e.npy", np.zeros(shape, dtype=np.float32))
    with pytest.raises(DataError, match=message):
        open_source(spec)


def test_missing_unreadable_and_unknown(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=rf"data file not found: {tmp_path}/nope\.npy"):
        open_source(str(tmp_path / "nope.npy"))
    (tmp_path / "junk.npy").write_bytes(b"\x00" * 100)
    with pytest.raises(DataError, match=r"cannot read .*junk\.npy as a \.npy file"):
        open_source(str(tmp_path / "junk.npy"))
    with pytest.raises(DataError, match="unknown data source prefix 'hf:'"):
        open_source("hf:mnist")
    with pytest.raises(DataError, match="cannot tell what kind of data"):
        open_source(str(tmp_path / "data.csv"))
    with pytest.raises(DataError, match="zarr store not found"):
        open_source(str(tmp_path / "no.zarr/x"))


def test_out_of_range_read_named(tmp_path: Path) -> None:
    src = open_source(_save(tmp_path / "x.npy", np.zeros((10, 2), dtype=np.float32)))
    with pytest.raises(DataError, match=r"samples \[8, 12\): the source has 10 samples"):
        src.read(8, 12)
    with pytest.raises(DataError, match=r"\[5, 4\)"):
        src.read(5, 4)


def test_pickles_as_its_spec(tmp_path: Path) -> None:
    spec = _save(tmp_path / "x.npy", np.random.default_rng(5).normal(size=(20000, 64)))
    src = open_source(spec)
    blob = pickle.dumps(src)
    assert len(blob) < 1000  # not the 10 MB of data
    np.testing.assert_array_equal(pickle.loads(blob).read(3, 9).x, src.read(3, 9).x)


def test_copying_a_tree_keeps_image_fingerprint(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    for i in range(4):
        _image(tmp_path / "a" / f"{i}.png", np.full((4, 4), 40 * i, dtype=np.uint8))
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    fa = open_source(f"images:{tmp_path / 'a'}").fingerprint()
    assert fa == open_source(f"images:{tmp_path / 'b'}").fingerprint()
    _image(tmp_path / "b" / "2.png", np.full((4, 4), 41, dtype=np.uint8))
    assert fa != open_source(f"images:{tmp_path / 'b'}").fingerprint()
