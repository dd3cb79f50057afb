"""Incremental extraction over growing sources: only new samples are encoded, into the same store."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from extract_helpers import tree_hash, write_gmm_job
from pflatents.flows.cli import main
from pflatents.storage import LatentStore, StoreError

ARGS = ["--shard-size", "300", "--batch-size", "100", "--solver", "rk4", "--steps", "6", "--no-progress"]


def _extract(data: str, model, out, *extra) -> int:
    return main(["extract", "--data", data, "--model", f"gmm:{model}", "--out", str(out), *ARGS, *extra])


def _records(out) -> dict:
    store = LatentStore.open(out, mode="r")
    return {i: store.shard_record(i) for i in range(store.n_shards)}


def test_npydir_grows_and_matches_one_shot_extraction(tmp_path, prefect_api, capsys):
    data, model = write_gmm_job(tmp_path, n=1200)
    x = np.load(data)
    folder, out = tmp_path / "incoming", tmp_path / "inc.zarr"
    folder.mkdir()
    np.save(folder / "000.npy", x[:700])
    assert _extract(f"npydir:{folder}", model, out) == 0
    store = LatentStore.open(out, mode="r")
    assert (store.incremental, store.n_samples, store.n_shards) == (True, 700, 3)
    first = _records(out)

    # nothing new: a cheap no-op that leaves every byte of the store as it was
    before = tree_hash(out)
    capsys.readouterr()
    assert _extract(f"npydir:{folder}", model, out) == 0
    assert "nothing new" in capsys.readouterr().out and tree_hash(out) == before

    # new files: only the new samples (and the old partial last shard) are encoded
    np.save(folder / "001.npy", x[700:1000])
    np.save(folder / "002.npy", x[1000:])
    (folder / "003.npy.partial").write_bytes(b"being copied")       # not a .npy name: ignored
    assert _extract(f"npydir:{folder}", model, out) == 0
    assert "500 new samples" in capsys.readouterr().out
    store = LatentStore.open(out, mode="r")
    assert (store.n_samples, store.n_planned, store.n_shards, store.pending_shards()) == (1200, 1200, 4, [])
    after = _records(out)
    assert after[0] == first[0] and after[1] == first[1]            # full old shards untouched
    assert after[2]["finished"] >= first[2]["finished"] and (after[2]["start"], after[2]["stop"]) == (600, 900)

    # bit-identical to extracting all 1200 samples at once
    assert _extract(str(data), model, tmp_path / "once.zarr") == 0
    got = zarr.open_group(str(out), mode="r")
    ref = zarr.open_group(str(tmp_path / "once.zarr"), mode="r")
    np.testing.assert_array_equal(got["latents"][:], ref["latents"][:])
    np.testing.assert_array_equal(got["nfe"][:], ref["nfe"][:])
    assert store.latents_dask().shape == (1200, 8)


def test_changed_prefix_is_refused_and_store_untouched(tmp_path, prefect_api, capsys):
    data, model = write_gmm_job(tmp_path, n=900)
    x = np.load(data)
    folder, out = tmp_path / "incoming", tmp_path / "inc.zarr"
    folder.mkdir()
    np.save(folder / "000.npy", x[:600])
    assert _extract(f"npydir:{folder}", model, out) == 0
    before = tree_hash(out)
    y = x[:600].copy()
    y[123, 4] += 1.0
    np.save(folder / "000.npy", y)
    np.save(folder / "001.npy", x[600:])
    capsys.readouterr()
    assert _extract(f"npydir:{folder}", model, out) == 2
    err = capsys.readouterr().err
    assert "changed in its first 600 samples" in err and "Traceback" not in err
    assert tree_hash(out) == before
    (folder / "001.npy").unlink()
    (folder / "000.npy").unlink()
    np.save(folder / "000.npy", x[:300])                            # the data shrank
    assert _extract(f"npydir:{folder}", model, out) == 2
    assert "fewer than the 600" in capsys.readouterr().err and tree_hash(out) == before


def test_growing_zarr_array_and_flag_mismatch(tmp_path, prefect_api, capsys):
    data, model = write_gmm_job(tmp_path, n=1000)
    x = np.load(data)
    src = zarr.create_array(str(tmp_path / "src.zarr"), shape=(400, 8), chunks=(100, 8), dtype="float32")
    src[:] = x[:400]
    out = tmp_path / "z.zarr"
    assert _extract(str(tmp_path / "src.zarr"), model, out, "--incremental") == 0
    src.resize((1000, 8))
    src[400:] = x[400:]
    assert _extract(str(tmp_path / "src.zarr"), model, out, "--incremental") == 0
    assert LatentStore.open(out, mode="r").n_samples == 1000
    assert _extract(str(data), model, tmp_path / "once.zarr") == 0
    np.testing.assert_array_equal(zarr.open_group(str(out), mode="r")["latents"][:],
                                  zarr.open_group(str(tmp_path / "once.zarr"), mode="r")["latents"][:])
    capsys.readouterr()
    # a fixed-length store is not extended, and an incremental one is not reused without --incremental
    assert _extract(str(tmp_path / "src.zarr"), model, tmp_path / "once.zarr", "--incremental") == 2
    assert _extract(str(tmp_path / "src.zarr"), model, out) == 2
    assert "is an incremental store" in capsys.readouterr().err


def test_readers_see_only_published_samples(tmp_path):
    store = LatentStore.create(tmp_path / "s.zarr", config={"c": 1}, n_samples=10, sample_shape=(4,),
                               shard_size=4, data_prefix={"n": 10, "fingerprint": "f0"})
    assert (store.n_samples, store.n_planned, store.n_shards) == (0, 10, 3)
    for i in range(3):
        i0, i1 = store.shard_range(i)
        store.write_shard(i, np.full((i1 - i0, 4), i, np.float32), np.ones(i1 - i0, np.int32))
    assert store.publish() and LatentStore.open(tmp_path / "s.zarr", mode="r").latents_dask().shape == (10, 4)
    assert store.grow(15, {"n": 15, "fingerprint": "f1"}) == [2, 3]   # shard 2 (8..10) was partial
    reader = LatentStore.open(tmp_path / "s.zarr", mode="r")
    assert reader.n_samples == 10 and reader.latents_dask().shape == (10, 4)   # grown, not published
    assert reader.latents_array().shape == (15, 4) and reader.pending_shards() == [2, 3]
    assert not store.publish()                                       # shards pending: nothing published
    with pytest.raises(StoreError, match="shrink"):
        store.grow(12, {"n": 12, "fingerprint": "f2"})


FAST = ["--solver", "rk4", "--steps", "6", "--no-progress"]  # no --shard-size, no --batch-size: the defaults


def test_second_incremental_run_keeps_the_default_shard_size(tmp_path, prefect_api, capsys):
    """The scheduled use case: the default shard size (clipped to the first N) stays pinned as N grows."""
    data, model = write_gmm_job(tmp_path, n=1200)
    x = np.load(data)
    folder, out = tmp_path / "incoming", tmp_path / "inc.zarr"
    folder.mkdir()
    np.save(folder / "000.npy", x[:700])
    run = ["extract", "--data", f"npydir:{folder}", "--model", f"gmm:{model}", "--out", str(out), *FAST]
    assert main(run) == 0
    assert LatentStore.open(out, mode="r").shard_size == 700
    np.save(folder / "001.npy", x[700:])
    assert main(run) == 0, capsys.readouterr().err
    store = LatentStore.open(out, mode="r")
    assert (store.shard_size, store.n_samples, store.n_shards, store.pending_shards()) == (700, 1200, 2, [])
    # an explicit, different shard size is still refused, naming the field and leaving the store as it was
    before = tree_hash(out)
    capsys.readouterr()
    assert main([*run, "--shard-size", "500"]) == 2
    assert "shard_size: stored 700, new 500" in capsys.readouterr().err and tree_hash(out) == before


def test_serve_runs_with_the_default_shard_size(tmp_path, prefect_api):
    """`serve` is incremental by default: two scheduled runs, no shard or batch size given."""
    from pflatents.flows.serve import run_scheduled

    data, model = write_gmm_job(tmp_path, n=900)
    x = np.load(data)
    folder, out = tmp_path / "incoming", tmp_path / "served.zarr"
    folder.mkdir()
    np.save(folder / "000.npy", x[:500])
    job = {"data": f"npydir:{folder}", "model": f"gmm:{model}", "out": str(out), "solver": "rk4", "steps": 6,
           "incremental": True}
    ok, message, _ = run_scheduled(job)
    assert ok, message
    np.save(folder / "001.npy", x[500:])
    ok, message, summary = run_scheduled(job)
    assert ok and summary["new"] == 400, message
    store = LatentStore.open(out, mode="r")
    assert (store.shard_size, store.n_samples, store.pending_shards()) == (500, 900, [])


def test_grown_source_without_incremental_says_so_then_converts(tmp_path, prefect_api, capsys):
    data, model = write_gmm_job(tmp_path, n=1000)
    x = np.load(data)
    src = tmp_path / "x.npy"
    np.save(src, x[:400])
    out = tmp_path / "fixed.zarr"
    run = ["extract", "--data", str(src), "--model", f"gmm:{model}", "--out", str(out), *FAST]
    assert main(run) == 0
    first = np.asarray(zarr.open_group(str(out), mode="r")["latents"][:])
    np.save(src, x)                                                   # the data grew
    before = tree_hash(out)
    capsys.readouterr()
    assert main(run) == 2
    err = capsys.readouterr().err
    assert "grew from 400 to 1000 samples" in err and "--incremental" in err and "Traceback" not in err
    assert tree_hash(out) == before
    # with --incremental the fixed-length store becomes incremental and only the new samples are encoded
    assert main([*run, "--incremental"]) == 0
    assert "600 new samples" in capsys.readouterr().out
    store = LatentStore.open(out, mode="r")
    assert (store.incremental, store.n_samples, store.shard_size, store.pending_shards()) == (True, 1000, 400, [])
    np.testing.assert_array_equal(store.latents_array()[:400], first)
    # a changed (not grown) prefix is refused as such
    other = [*run[:5], "--out", str(tmp_path / "other.zarr"), *FAST]
    np.save(src, x[:400])
    assert main(other) == 0
    y = x.copy()
    y[5, 0] += 1.0
    np.save(src, y)
    capsys.readouterr()
    assert main(other) == 2
    assert "are not those" in capsys.readouterr().err
