"""The Zarr v3 latent store on real disk: layout, config pinning, shard writes, verify (the lock: test_lock.py)."""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import shutil
import threading
import time
from pathlib import Path

import dask.array as da
import google_crc32c
import numpy as np
import pytest
import xarray as xr
import zarr

from pflatents.storage import (
    ConfigMismatchError,
    LatentStore,
    NotAStoreError,
    ShardVerifyError,
    StoreError,
    checksum,
    config_hash,
    default_shard_size,
    open_or_create,
    plan_shards,
)
from store_workers import shard_data, write_shards

REPO = Path(__file__).resolve().parents[1]
CONFIG = {"data": {"spec": "x.npy", "fingerprint": "blake2b:ab"},
          "solver": {"name": "dopri5", "rtol": 1e-5, "atol": 1e-5}, "t_eps": 1e-5}


def _make(path: Path, n: int = 10, shape: tuple[int, ...] = (4,), shard: int = 4,
          config: dict | None = None) -> LatentStore:
    """Create a store at ``path``."""
    return LatentStore.create(path, config=config or CONFIG, n_samples=n, sample_shape=shape,
                              shard_size=shard)


def _tree_digest(root: Path) -> str:
    """Hash of every file's path, bytes and mtime under ``root``."""
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(f"{p.relative_to(root)}:{p.stat().st_mtime_ns}".encode() + p.read_bytes())
    return h.hexdigest()


# ---- layout ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("shape", "dims"), [
    ((64,), ("sample", "dim")),
    ((3, 8, 8), ("sample", "channel", "height", "width")),
    ((2, 5), ("sample", "dim_0", "dim_1"))])
def test_create_layout(tmp_path: Path, shape: tuple[int, ...], dims: tuple[str, ...]) -> None:
    store = _make(tmp_path / "s.zarr", n=10, shape=shape, shard=4)
    group = zarr.open_group(tmp_path / "s.zarr", mode="r", zarr_format=3)
    lat, nfe = group["latents"], group["nfe"]
    assert lat.shape == (10, *shape) and lat.dtype == np.float32 and lat.chunks == (4, *shape)
    assert lat.metadata.dimension_names == dims and lat.shards is None
    (codec,) = lat.compressors
    assert isinstance(codec, zarr.codecs.ZstdCodec) and codec.level == 3
    assert nfe.shape == (10,) and nfe.dtype == np.int32 and nfe.chunks == (4,)
    assert nfe.metadata.dimension_names == ("sample",)
    meta = group.attrs["pflatents"]
    assert meta["format_version"] == 2 and meta["config"] == CONFIG  # format 2 since the explicit pinned config
    assert meta["config_hash"] == config_hash(CONFIG) == store.config_hash
    assert {"zarr", "numpy", "python"} <= set(meta["versions"])
    assert (meta["n_samples"], meta["sample_shape"], meta["shard_size"], meta["n_shards"]) == (
        10, list(shape), 4, 3)
    assert store.pending_shards() == [0, 1, 2]


def test_config_json_and_hash() -> None:
    np_config = {"t_eps": np.float64(1e-5), "steps": np.int64(8), "shape": (3, np.int32(8)),
                 "flag": np.bool_(True), "nested": {"b": 2, "a": [np.float32(0.5)]}}
    plain = {"nested": {"a": [0.5], "b": 2}, "flag": True, "shape": [3, 8], "steps": 8,
             "t_eps": 1e-5}
    assert config_hash(np_config) == config_hash(plain)
    assert config_hash(plain) != config_hash({**plain, "steps": 9})
    store_config = json.loads(json.dumps(plain))
    assert config_hash(store_config) == config_hash(plain)
    with pytest.raises(StoreError, match=r"config\.bad has a object value"):
        config_hash({"bad": object()})


def test_config_numpy_scalars_written_as_plain_json(tmp_path: Path) -> None:
    _make(tmp_path / "s.zarr", config={"rtol": np.float32(0.25), "n": np.int64(3)})
    meta = json.loads((tmp_path / "s.zarr" / "zarr.json").read_text())["attributes"]
    assert meta["pflatents"]["config"] == {"rtol": 0.25, "n": 3}


# ---- open / open_or_create ------------------------------------------------------------------


def test_open_or_create_same_config_continues(tmp_path: Path) -> None:
    store = open_or_create(tmp_path / "s.zarr", config=CONFIG, n_samples=10, sample_shape=(4,),
                           shard_size=4)
    store.write_shard(1, *shard_data(store, 1))
    again = open_or_create(tmp_path / "s.zarr", config=json.loads(json.dumps(CONFIG)),
                           n_samples=10, sample_shape=(4,), shard_size=4)
    assert again.pending_shards() == [0, 2] and again.verify_shard(1)


def test_open_or_create_different_config_refused_untouched(tmp_path: Path) -> None:
    path = tmp_path / "s.zarr"
    store = _make(path)
    store.write_shard(0, *shard_data(store, 0))
    before = _tree_digest(path)
    new = {**CONFIG, "solver": {**CONFIG["solver"], "rtol": 1e-3},
           "data": {**CONFIG["data"], "fingerprint": "blake2b:cd"}}
    with pytest.raises(ConfigMismatchError) as err:
        open_or_create(path, config=new, n_samples=12, sample_shape=(4,), shard_size=4)
    text = str(err.value)
    assert "config.solver.rtol: stored 1e-05, new 0.001" in text
    assert "config.data.fingerprint: stored 'blake2b:ab', new 'blake2b:cd'" in text
    assert "n_samples: stored 10, new 12" in text and str(path) in text
    assert len(err.value.differences) == 3 and "config.t_eps" not in text
    assert _tree_digest(path) == before


def test_refuses_what_is_not_a_store(tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(NotAStoreError, match=f"{other} exists and is not a pflatents store"):
        _make(other)
    with pytest.raises(NotAStoreError, match=f"{other} exists and is not a pflatents store"):
        open_or_create(other, config=CONFIG, n_samples=10, sample_shape=(4,), shard_size=4)
    plain = tmp_path / "plain.zarr"
    zarr.open_group(plain, mode="w", zarr_format=3).attrs["x"] = 1
    with pytest.raises(NotAStoreError, match="not a pflatents store"):
        LatentStore.open(plain)
    with pytest.raises(NotAStoreError, match="no pflatents store at"):
        LatentStore.open(tmp_path / "absent.zarr")
    assert (other / "notes.txt").read_text() == "mine" and sorted(os.listdir(other)) == [
        "notes.txt"]


def test_existing_store_and_unwritable_path(tmp_path: Path) -> None:
    _make(tmp_path / "s.zarr")
    with pytest.raises(StoreError, match="already exists"):
        _make(tmp_path / "s.zarr")
    (tmp_path / "file").write_text("")
    with pytest.raises(StoreError, match=f"cannot write a store at {tmp_path}/file/s.zarr"):
        _make(tmp_path / "file" / "s.zarr")


def test_interrupted_creation_is_recreated(tmp_path: Path) -> None:
    path = tmp_path / "s.zarr"
    store = _make(path, shard=4)
    store.write_shard(0, *shard_data(store, 0))
    group = zarr.open_group(path, mode="r+", zarr_format=3)
    group.attrs.put({"pflatents_incomplete": {"pid": 1}})  # as if killed before the last step
    with pytest.raises(NotAStoreError, match="incomplete pflatents store"):
        LatentStore.open(path)
    fresh = open_or_create(path, config=CONFIG, n_samples=10, sample_shape=(4,), shard_size=5)
    assert fresh.shard_size == 5 and fresh.shard_records() == {} and fresh.n_shards == 2
    assert LatentStore.open(path, mode="r").latents_array().chunks == (5, 4)


def test_read_only_refuses_writes(tmp_path: Path) -> None:
    store = _make(tmp_path / "s.zarr")
    ro = LatentStore.open(tmp_path / "s.zarr", mode="r")
    with pytest.raises(StoreError, match="opened read-only"):
        ro.write_shard(0, *shard_data(store, 0))


# ---- planning -------------------------------------------------------------------------------


def test_plan_shards() -> None:
    assert plan_shards(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert plan_shards(8, 4) == [(0, 4), (4, 8)] and plan_shards(3, 10) == [(0, 3)]
    ranges = plan_shards(1797, 100)
    assert ranges[0][0] == 0 and ranges[-1][1] == 1797
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    with pytest.raises(StoreError):
        plan_shards(10, 0)


def test_default_shard_size_by_bytes() -> None:
    assert default_shard_size(256) == 32768  # 64 float32: 8 MiB chunks
    assert default_shard_size(256, n_samples=1797) == 1797
    assert default_shard_size(4 * 3 * 64 * 64) == 128  # 170 rounded down to a multiple of 64
    assert default_shard_size(40 << 20) == 1
    assert default_shard_size(256, target_bytes=1 << 20) * 256 == 1 << 20


# ---- writing and reading shards -------------------------------------------------------------


def test_write_shard_read_back_three_ways(tmp_path: Path) -> None:
    path = tmp_path / "s.zarr"
    store = _make(path, n=10, shape=(2, 3, 3), shard=4)
    data = {i: shard_data(store, i) for i in range(3)}
    for i, (x, nfe) in data.items():
        record = store.write_shard(i, x, nfe, {"device": "cpu", "timings": {"ode_s": 0.5}})
        assert record["state"] == "done" and record["checksum"].startswith("crc32c:")
    x_all = np.concatenate([data[i][0] for i in range(3)]).astype(np.float32)
    nfe_all = np.concatenate([data[i][1] for i in range(3)])
    group = zarr.open_group(path, mode="r", zarr_format=3)
    np.testing.assert_array_equal(group["latents"][:], x_all)
    np.testing.assert_array_equal(group["nfe"][:], nfe_all)
    np.testing.assert_array_equal(da.from_zarr(str(path), component="latents").compute(), x_all)
    ds = xr.open_zarr(path, consolidated=False)
    assert ds["latents"].dims == ("sample", "channel", "height", "width")
    assert ds["nfe"].dims == ("sample",) and ds["nfe"].dtype == np.int32
    assert ds.attrs["pflatents"]["config"] == CONFIG
    assert group["shards/000002"].attrs["state"] == "done"  # records are zarr groups too
    np.testing.assert_array_equal(ds["latents"].values, x_all)
    np.testing.assert_array_equal(store.open_xarray()["nfe"].values, nfe_all)
    record = store.shard_records()[2]
    assert (record["start"], record["stop"], record["device"]) == (8, 10, "cpu")
    assert record["timings"]["ode_s"] == 0.5 and record["pid"] == os.getpid()
    assert {"write_s", "verify_s"} <= set(record["timings"]) and record["error"] is None
    assert store.status()["done"] == 3 and store.pending_shards() == []


def test_write_shard_validates_shape_and_dtype(tmp_path: Path) -> None:
    store = _make(tmp_path / "s.zarr")
    x, nfe = shard_data(store, 2)
    with pytest.raises(StoreError, match=r"latents have shape \(3, 4\), expected \(2, 4\)"):
        store.write_shard(2, np.zeros((3, 4)), nfe)
    with pytest.raises(StoreError, match="shard 2: latents have dtype int64; floats required"):
        store.write_shard(2, np.zeros((2, 4), dtype=np.int64), nfe)
    with pytest.raises(StoreError, match=r"shard 2: nfe has shape \(3,\)"):
        store.write_shard(2, x, np.ones(3, dtype=int))
    with pytest.raises(StoreError, match=r"shard 3 does not exist: .* has 3 shards \(0\.\.2\)"):
        store.write_shard(3, x, nfe)
    assert store.shard_records() == {}


def test_non_finite_shard_refused_not_done(tmp_path: Path) -> None:
    path = tmp_path / "s.zarr"
    store = _make(path)
    x, nfe = shard_data(store, 1)
    x[1, 0], x[2, 3] = np.nan, np.inf
    with pytest.raises(ShardVerifyError, match=r"shard 1 \(samples 4\.\.7\).*samples 5, 6"):
        store.write_shard(1, x, nfe)
    assert 1 in store.pending_shards() and store.shard_record(1) is None
    assert not (path / "latents" / "c" / "1" / "0").exists()
    with pytest.raises(ShardVerifyError, match="shard 0"):
        store.write_shard(0, np.full((4, 4), 1e39), np.ones(4, dtype=int))  # overflows float32


def test_half_written_shard_is_pending(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "s.zarr"
    store = _make(path)
    monkeypatch.setenv("PFLATENTS_PAUSE_IN_WRITE", "1.5")
    worker = threading.Thread(target=store.write_shard, args=(1, *shard_data(store, 1)))
    worker.start()
    deadline = time.time() + 30
    while not (path / "latents" / "c" / "1" / "0").exists() and time.time() < deadline:
        time.sleep(0.01)
    reader = LatentStore.open(path, mode="r")  # what a resume after a crash right now sees
    assert reader.shard_record(1)["state"] == "writing" and 1 in reader.pending_shards()
    assert not (path / "nfe" / "c" / "1").exists() and not reader.verify_shard(1)
    assert reader.status()["pending"] == 3
    worker.join(30)
    assert reader.shard_record(1)["state"] == "done" and reader.verify_shard(1)


@pytest.mark.parametrize("corruption", ["garbage", "other_shard"])
def test_verify_catches_a_corrupted_chunk(tmp_path: Path, corruption: str) -> None:
    path = tmp_path / "s.zarr"
    store = _make(path, n=12, shape=(4,), shard=4)
    for i in range(3):
        store.write_shard(i, *shard_data(store, i))
    assert all(store.verify_shard(i) for i in range(3))
    chunk = path / "latents" / "c" / "1" / "0"
    if corruption == "garbage":
        chunk.write_bytes(os.urandom(chunk.stat().st_size))
    else:
        shutil.copyfile(path / "latents" / "c" / "2" / "0", chunk)  # decodes fine, wrong data
    assert not store.verify_shard(1)
    assert LatentStore.open(path, mode="r").verify_shard(0)


def test_checksum_formats() -> None:
    x = np.arange(12, dtype=np.float32).reshape(3, 4) - 5.5
    n = np.array([7, 8, 9], dtype=np.int32)
    data = x.astype("<f4").tobytes() + n.astype("<i4").tobytes()
    assert checksum(x, n) == f"crc32c:{google_crc32c.value(data):08x}"  # the default, stable
    assert checksum(x, n, "blake2b") == "blake2b:" + hashlib.blake2b(data, digest_size=20).hexdigest()
    assert checksum(x.astype(">f4"), n.astype(np.int64)) == checksum(x, n)  # bytes, not dtypes
    with pytest.raises(StoreError, match="unknown checksum algorithm"):
        checksum(x, n, "md5")


def test_old_blake2b_record_still_verifies(tmp_path: Path) -> None:
    path = tmp_path / "s.zarr"
    store = _make(path, n=12, shape=(4,), shard=4)
    for i in range(3):
        store.write_shard(i, *shard_data(store, i))
    for i in range(3):  # records as the previous release wrote them
        x, nfe = shard_data(store, i)
        record = {**store.shard_record(i), "checksum": checksum(x.astype(np.float32), nfe, "blake2b")}
        store._put_record(i, record)
    assert all(store.verify_shard(i) for i in range(3))
    chunk = path / "latents" / "c" / "1" / "0"
    shutil.copyfile(path / "latents" / "c" / "2" / "0", chunk)  # decodes fine, wrong data
    result = store.verify()
    assert (result["ok"], [c["id"] for c in result["corrupt"]]) == (2, [1])
    assert "blake2b:" in result["corrupt"][0]["error"] and store.pending_shards() == [1]
    store._put_record(0, {**store.shard_record(0), "checksum": "sha1:00"})
    assert "no known checksum" in store.shard_problem(0, store.shard_record(0))


def test_read_back_mismatch_is_not_done(tmp_path: Path, monkeypatch) -> None:
    store = _make(tmp_path / "s.zarr")
    x, nfe = shard_data(store, 1)
    real = LatentStore._read_chunk

    def flipped(self, i0, i1):  # the store hands back something else than was written
        y, m, st = real(self, i0, i1)
        y = y.copy()
        y[2, 1] = -y[2, 1]
        return y, m, st

    monkeypatch.setattr(LatentStore, "_read_chunk", flipped)
    with pytest.raises(ShardVerifyError, match=r"verification: latents .* samples 6; not marked done"):
        store.write_shard(1, x, nfe)
    assert store.shard_record(1)["state"] == "writing" and 1 in store.pending_shards()
    monkeypatch.setattr(LatentStore, "_read_chunk", lambda self, i0, i1: "cannot read the chunk back (boom)")
    with pytest.raises(ShardVerifyError, match="boom"):
        store.write_shard(1, x, nfe)
    monkeypatch.undo()
    assert store.write_shard(1, x, nfe)["state"] == "done" and store.verify_shard(1)


def test_rewrite_is_idempotent(tmp_path: Path) -> None:
    path = tmp_path / "s.zarr"
    store = _make(path)
    x, nfe = shard_data(store, 0)
    first = store.write_shard(0, x, nfe)
    files = sorted(p.relative_to(path) for p in path.rglob("*") if p.is_file())
    second = store.write_shard(0, x + 1, nfe)
    assert second["checksum"] != first["checksum"] and store.verify_shard(0)
    np.testing.assert_allclose(store.latents_array()[0:4], x + 1, rtol=1e-6)
    assert sorted(p.relative_to(path) for p in path.rglob("*") if p.is_file()) == files


def test_failed_shards_and_status(tmp_path: Path) -> None:
    store = _make(tmp_path / "s.zarr", n=10, shard=2)
    store.write_shard(0, *shard_data(store, 0))
    store.mark_failed(3, "RuntimeError: CUDA out of memory", {"device": "cuda:0"})
    status = store.status()
    assert (status["n_shards"], status["done"], status["failed"], status["pending"]) == (
        5, 1, 1, 3)
    assert status["failed_shards"] == [{"id": 3, "error": "RuntimeError: CUDA out of memory"}]
    assert status["config"] == CONFIG and status["n_samples"] == 10
    assert store.pending_shards() == [1, 2, 3, 4]
    assert store.shard_record(3)["device"] == "cuda:0"
    store.write_shard(3, *shard_data(store, 3))
    assert store.status()["failed"] == 0 and store.pending_shards() == [1, 2, 4]


def test_concurrent_shard_writes_from_processes(tmp_path: Path) -> None:
    path = tmp_path / "s.zarr"
    store = _make(path, n=16 * 256 - 100, shape=(64,), shard=256)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=write_shards, args=(str(path), list(range(k, 16, 4))))
             for k in range(4)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(60)
    assert [proc.exitcode for proc in procs] == [0, 0, 0, 0]
    fresh = LatentStore.open(path, mode="r")
    records = fresh.shard_records()
    assert sorted(records) == list(range(16)) and fresh.pending_shards() == []
    assert len({r["pid"] for r in records.values()}) == 4
    for i in range(16):
        x, nfe = shard_data(fresh, i)
        i0, i1 = fresh.shard_range(i)
        np.testing.assert_array_equal(fresh.latents_array()[i0:i1], x.astype(np.float32))
        np.testing.assert_array_equal(fresh.nfe_array()[i0:i1], nfe)
        assert fresh.verify_shard(i)
    assert fresh.meta["config"] == CONFIG
