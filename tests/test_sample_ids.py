"""The store's per-sample ids and labels: written with a shard's latents, read back, checksummed and
verified with them, grown with them, opened as xarray coordinates; stores without them keep working."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr

from pflatents.storage import LatentStore, ShardVerifyError, StoreError
from pflatents.storage.checksums import checksum

CONFIG = {"data": {"spec": "x"}, "model": {"spec": "m"}}


def _store(path: Path, labels: bool = True, n: int = 10, prefix: dict | None = None) -> LatentStore:
    return LatentStore.create(path, config=CONFIG, n_samples=n, sample_shape=(3,), shard_size=4,
                              sample_ids=True, labels=labels, data_prefix=prefix)


def _shard(store: LatentStore, sid: int):
    i0, i1 = store.shard_range(sid)
    rng = np.random.default_rng(sid)
    ids = np.array([f"cls{i % 3}/ümlaut {i}.png" for i in range(i0, i1)])
    return rng.normal(size=(i1 - i0, 3)).astype(np.float32), rng.integers(5, 50, i1 - i0), ids, np.arange(i0, i1) % 3


def test_ids_and_labels_written_verified_and_exposed(tmp_path: Path) -> None:
    store = _store(tmp_path / "s.zarr")
    for sid in range(store.n_shards):
        x, n, ids, labels = _shard(store, sid)
        record = store.write_shard(sid, x, n, ids=ids, labels=labels)
        # the checksum covers ids and labels: it is not the latents' and NFE's alone
        assert record["checksum"] == checksum(x, n, ids=ids, labels=labels) != checksum(x, n)
    got_ids, got_labels = store.read_ids_labels()
    want = [_shard(store, s) for s in range(store.n_shards)]
    assert got_ids.tolist() == [i for w in want for i in w[2].tolist()]
    assert got_labels.tolist() == [i % 3 for i in range(10)] and got_labels.dtype == np.int64
    assert store.verify()["ok"] == 3
    ds = xr.open_zarr(tmp_path / "s.zarr", consolidated=False)  # without pflatents: coordinates by CF attrs
    assert {"sample_id", "label"} <= set(ds.coords) and ds["sample_id"].dims == ("sample",)
    ds = LatentStore.open(tmp_path / "s.zarr", mode="r").open_xarray()
    assert [str(s) for s in ds["sample_id"].values.tolist()] == got_ids.tolist()
    assert ds["label"].values.tolist() == got_labels.tolist()
    assert zarr.open_array(str(tmp_path / "s.zarr" / "sample_id"), mode="r").metadata.data_type.to_json(3) == "string"


def test_a_changed_id_or_label_is_corrupt(tmp_path: Path) -> None:
    store = _store(tmp_path / "s.zarr")
    for sid in range(store.n_shards):
        x, n, ids, labels = _shard(store, sid)
        store.write_shard(sid, x, n, ids=ids, labels=labels)
    g = zarr.open_group(str(tmp_path / "s.zarr"), mode="r+")
    g["sample_id"][5] = "someone else"
    g["label"][9] = 7
    report = LatentStore.open(tmp_path / "s.zarr").verify()
    assert sorted(c["id"] for c in report["corrupt"]) == [1, 2]
    assert all("checksum" in c["error"] for c in report["corrupt"])


def test_missing_or_bad_ids_refused_before_writing(tmp_path: Path) -> None:
    store = _store(tmp_path / "s.zarr")
    x, n, ids, labels = _shard(store, 0)
    with pytest.raises(StoreError, match="keeps sample ids; none were given"):
        store.write_shard(0, x, n, labels=labels)
    with pytest.raises(StoreError, match="labels must be 4 integers"):
        store.write_shard(0, x, n, ids=ids, labels=labels[:3])
    assert store.shard_record(0) is None


def test_read_back_mismatch_of_ids_is_not_done(tmp_path: Path, monkeypatch) -> None:
    store = _store(tmp_path / "s.zarr", labels=False)
    x, n, ids, _ = _shard(store, 0)
    monkeypatch.setattr(LatentStore, "_read_id_chunk", lambda self, i0, i1: (np.array(["x"] * 4), None))
    with pytest.raises(ShardVerifyError, match="sample ids read back differ"):
        store.write_shard(0, x, n, ids=ids)
    assert store.shard_record(0)["state"] == "writing"


def test_growth_keeps_ids_aligned(tmp_path: Path) -> None:
    store = _store(tmp_path / "s.zarr", n=6, prefix={"n": 6, "fingerprint": "a"})
    for sid in range(store.n_shards):
        x, n, ids, labels = _shard(store, sid)
        store.write_shard(sid, x, n, ids=ids, labels=labels)
    store.publish()
    assert store.grow(11, {"n": 11, "fingerprint": "b"}) == [1, 2]
    assert store.read_ids_labels()[0].shape == (11,) and store.read_ids_labels()[1][6:].tolist() == [-1] * 5
    for sid in (1, 2):
        x, n, ids, labels = _shard(store, sid)
        store.write_shard(sid, x, n, ids=ids, labels=labels)
    store.publish()
    assert store.read_ids_labels()[0].tolist() == [f"cls{i % 3}/ümlaut {i}.png" for i in range(11)]
    assert store.verify()["ok"] == 3


def test_stores_without_ids_keep_their_checksums(tmp_path: Path) -> None:
    store = LatentStore.create(tmp_path / "old.zarr", config=CONFIG, n_samples=4, sample_shape=(3,), shard_size=4)
    x, n, ids, labels = _shard(store, 0)
    record = store.write_shard(0, x, n, ids=ids, labels=labels)  # ids given to a store without them: ignored
    assert record["checksum"] == checksum(x, n) and store.read_ids_labels() == (None, None)
    ds = store.open_xarray()
    assert "sample_id" not in ds.variables and store.verify()["ok"] == 1
