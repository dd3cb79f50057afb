"""Per-sample status: samples the solver cannot finish are stored flagged (NaN latents) in a done
shard, counted, verifiable, excluded by ``failed_mask``, and re-integrated by ``resume --retry-samples``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import zarr

from pflatents.storage import LatentStore, ShardVerifyError, StoreError, checksum
from pflatents.storage.layout import SAMPLE_STATUS
from pflatents.tasks.ode import solvers
from pflatents.tasks.wrappers.extract import InjectedFault, TransientFault, can_change_on_retry, stricter
from store_workers import shard_data

CONFIG = {"c": 1}


def _make(path) -> LatentStore:
    return LatentStore.create(path, config=CONFIG, n_samples=10, sample_shape=(4,), shard_size=4)


def test_store_codes_are_the_solver_codes() -> None:
    assert {code: name for code, name in enumerate(SAMPLE_STATUS)} == solvers.STATUS_NAMES


def test_flagged_samples_finish_their_shard_with_nan_latents(tmp_path) -> None:
    store = _make(tmp_path / "s.zarr")
    x, nfe = shard_data(store, 1)                                 # samples 4..7
    status = np.array([0, 1, 0, 2], dtype=np.int8)
    record = store.write_shard(1, x, nfe, status=status)
    assert record["state"] == "done" and record["samples_failed"] == 2
    assert record["sample_status"] == {"step_limit": 1, "nonfinite": 1} and record["failed_samples"] == "5, 7"
    got = store.latents_array()[4:8]
    assert np.isnan(got[[1, 3]]).all() and np.array_equal(got[[0, 2]], x[[0, 2]].astype(np.float32))
    np.testing.assert_array_equal(store.failed_mask(0, 10), [0, 0, 0, 0, 0, 1, 0, 1, 0, 0])
    np.testing.assert_array_equal(store.sample_status(4, 8), status)
    assert store.verify_shard(1) and store.pending_shards() == [0, 2]
    st = store.status()
    assert (st["samples_failed"], st["shards_with_failed_samples"]) == (2, [1])
    assert store.shards_with_failed_samples() == [1]
    # the status is covered by the checksum: a flipped status byte is found by verify
    store._status[5] = 0
    assert not store.verify_shard(1)
    # a NaN in a sample that is not flagged is still refused, and nothing is written
    y = x[:2].copy()
    y[1, 0] = np.nan
    with pytest.raises(ShardVerifyError, match="latents at samples 9; not written"):
        store.write_shard(2, y, nfe[:2])
    assert store.shard_record(2) is None
    with pytest.raises(StoreError, match="status codes must lie in 0..2"):
        store.write_shard(0, *shard_data(store, 0), status=np.array([0, 3, 0, 0]))


def test_unflagged_shards_keep_their_checksum(tmp_path) -> None:
    store = _make(tmp_path / "s.zarr")
    x, nfe = shard_data(store, 0)
    record = store.write_shard(0, x, nfe, status=np.zeros(4, np.int8))
    assert record["checksum"] == checksum(x.astype(np.float32), nfe.astype(np.int32))
    assert "samples_failed" not in record


def test_a_store_made_before_the_status_array_gets_it(tmp_path) -> None:
    path = tmp_path / "s.zarr"
    store = _make(path)
    store.write_shard(0, *shard_data(store, 0))
    group = zarr.open_group(str(path), mode="r+")
    del group["status"]                                          # as an older pflatents made it
    old = LatentStore.open(path)
    assert old.failed_mask().sum() == 0 and old.verify_shard(0)  # all ok, old records verify
    with pytest.raises(StoreError, match="no per-sample status array"):
        old.write_shard(1, *shard_data(old, 1), status=np.array([1, 0, 0, 0]))
    assert old.ensure_status_array() and not old.ensure_status_array()
    assert old.write_shard(1, *shard_data(old, 1), status=np.array([1, 0, 0, 0]))["samples_failed"] == 1
    assert LatentStore.open(path, mode="r").failed_mask(4, 8).tolist() == [True, False, False, False]


def test_only_errors_that_can_change_are_retried() -> None:
    from pflatents.storage import ConfigMismatchError, LeaseLostError
    from pflatents.tasks.errors import DataError

    for exc in (OSError("network"), TimeoutError(), MemoryError(), RuntimeError("CUDA out of memory"),
                ShardVerifyError("read back differs"), TransientFault("once")):
        assert can_change_on_retry(exc), exc
    for exc in (InjectedFault("always"), DataError("NaN in data"), StoreError("bad shape"),
                ConfigMismatchError("x", []), LeaseLostError("lost"), TypeError(), KeyError("k"), None):
        assert not can_change_on_retry(exc), exc


def test_stricter_setting() -> None:
    from pflatents.tasks.ode.pfode import SolverConfig

    s = stricter(SolverConfig("dopri5", rtol=1e-5, atol=1e-5, max_steps=100))
    assert (s.rtol, s.atol, s.max_steps) == (pytest.approx(1e-6), pytest.approx(1e-6), 1000)
    assert stricter(SolverConfig("rk4", steps=6)).steps == 24
    json.dumps(s.to_dict())


def test_flagged_samples_end_to_end_then_retry_samples(tmp_path, prefect_api, capsys, monkeypatch):
    import torch

    import pflatents.tasks.wrappers.extract as wrap
    from extract_helpers import write_gmm_job
    from pflatents.flows.cli import main
    from pflatents.tasks.models.scores import GaussianMixtureScore
    from pflatents.tasks.ode.batches import encode_block
    from pflatents.tasks.ode.pfode import SolverConfig
    from pflatents.tasks.ode.sde import VPSDE

    data, model = write_gmm_job(tmp_path, n=600)
    url = str(tmp_path / "out.zarr")
    args = ["--shard-size", "200", "--batch-size", "100", "--solver", "rk4", "--steps", "6", "--no-progress"]
    real = wrap.encode_block

    def flaky(model_, sde, block, solver, batch_size, device, dtype="float32"):
        z, nfe, status = real(model_, sde, block, solver, batch_size, device, dtype)
        status = status.copy()
        status[3::97] = solvers.STEP_LIMIT                       # as if the solver hit its step limit there
        return z, nfe, status

    monkeypatch.setattr(wrap, "encode_block", flaky)
    assert main(["extract", "--data", str(data), "--model", f"gmm:{model}", "--out", url, *args]) == 0
    out = capsys.readouterr().out
    flagged = [s + i for s in (0, 200, 400) for i in range(3, 200, 97)]     # 3, 100, 197 in each shard
    assert f"{len(flagged)} sample(s) could not be integrated" in out and "--retry-samples" in out
    assert main(["status", url, "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert (st["done"], st["failed"], st["samples_failed"]) == (3, 0, len(flagged))
    assert main(["status", url]) == 0
    assert f"flagged  {len(flagged)} samples" in capsys.readouterr().out
    store = LatentStore.open(url, mode="r")
    assert np.flatnonzero(store.failed_mask()).tolist() == flagged
    x = np.load(data)
    sde, gmm = VPSDE(), GaussianMixtureScore.from_json(model, VPSDE())
    z, nfe, _ = encode_block(gmm, sde, x, SolverConfig("rk4", steps=6), 100, torch.device("cpu"))
    keep = ~store.failed_mask()
    np.testing.assert_array_equal(store.latents_array()[:][keep], z[keep])
    assert np.isnan(store.latents_array()[:][~keep]).all()

    monkeypatch.setattr(wrap, "encode_block", real)
    assert main(["resume", url, "--no-progress"]) == 0                # a plain resume: nothing to do
    assert "nothing to do" in capsys.readouterr().out
    assert main(["resume", url, "--retry-samples", "--no-progress"]) == 0
    store = LatentStore.open(url, mode="r")
    assert store.failed_mask().sum() == 0 and store.status()["samples_failed"] == 0
    got = store.latents_array()[:]
    np.testing.assert_array_equal(got[keep], z[keep])                 # the others kept bit for bit
    strict = SolverConfig("rk4", steps=24)
    for s in (0, 200, 400):
        idx = np.array([i for i in flagged if s <= i < s + 200])
        ref, _, _ = encode_block(gmm, sde, x[idx], strict, 100, torch.device("cpu"), "float64")
        np.testing.assert_allclose(got[idx], ref, rtol=1e-6, atol=1e-6)
    record = store.shard_record(1)
    assert record["retried_samples"] == {"n": 3, "recovered": 3, "solver": strict.to_dict(), "dtype": "float64"}
    assert store.verify(mark=False)["corrupt"] == []


def test_resume_warns_where_bitwise_equality_is_not_promised(tmp_path) -> None:
    from pflatents.flows.coordinator import bitwise_caveats

    store = _make(tmp_path / "s.zarr")
    store.write_shard(0, *shard_data(store, 0), {"device": "cpu"})
    assert bitwise_caveats(store, "cpu") == []                  # same kind, same versions: bit for bit
    store.write_shard(1, *shard_data(store, 1), {"device": "cuda:0"})
    store.meta["versions"]["torch"] = "0.0.1"
    lines = bitwise_caveats(store, "cpu")
    assert "torch 0.0.1 -> " in lines[0] and "done shards ran on cpu, cuda, this run on cpu" in lines[1]
    assert "not bit for bit" in lines[-1]
