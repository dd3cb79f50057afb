"""Extraction end to end through the real CLI entry point, a real Prefect server and a real Zarr store."""

from __future__ import annotations

import json

import dask.array as da
import numpy as np
import pytest
import torch
import xarray as xr
import zarr

from extract_helpers import tree_hash, write_gmm_job
from pflatents.flows.cli import main
from pflatents.tasks.ode.batches import encode_block
from pflatents.tasks.ode.pfode import SolverConfig
from pflatents.tasks.models.scores import GaussianMixtureScore
from pflatents.tasks.ode.sde import VPSDE

FIXED = ["--solver", "rk4", "--steps", "12"]


@pytest.fixture
def job(tmp_path):
    data, model = write_gmm_job(tmp_path, n=1000)
    return tmp_path, data, model


def _extract(tmp, data, model, out="out.zarr", extra=()):
    return main(["extract", "--data", str(data), "--model", f"gmm:{model}", "--out", str(tmp / out),
                 "--shard-size", "250", "--batch-size", "100", "--no-progress", *FIXED, *extra])


def test_extract_matches_direct_encoding_and_is_readable(job, prefect_api, capsys):
    tmp, data, model = job
    assert _extract(tmp, data, model) == 0
    url = str(tmp / "out.zarr")
    # latents equal a direct, orchestration-free encode of the same batches
    x = np.load(data)
    gmm = GaussianMixtureScore.from_json(model, VPSDE())
    z, nfe, status = encode_block(gmm, VPSDE(), x, SolverConfig("rk4", steps=12), 100, torch.device("cpu"))
    g = zarr.open_group(url, mode="r")
    np.testing.assert_array_equal(g["latents"][:], z)
    np.testing.assert_array_equal(g["nfe"][:], nfe)
    assert g["latents"].dtype == np.float32 and g["nfe"].dtype == np.int32
    assert g["latents"].chunks == (250, 8)
    cfg = g.attrs["pflatents"]["config"]
    assert cfg["solver"] == {"name": "rk4", "t_eps": 1e-4, "steps": 12, "grid": "logsnr"}
    assert cfg["model"]["content_hash"] == gmm.content_hash
    # analysts' readers
    arr = da.from_zarr(url, component="latents")
    np.testing.assert_array_equal(arr.compute(), z)
    ds = xr.open_zarr(url, consolidated=False)
    assert ds["latents"].dims == ("sample", "dim")
    assert "pflatents" in ds.attrs and ds.attrs["pflatents"]["config"]["data"]["n_samples"] == 1000
    # same config again: nothing to do; status reports all done
    assert _extract(tmp, data, model) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert main(["status", url, "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert (st["n_shards"], st["done"], st["failed"], st["pending"]) == (4, 4, 0, 0)


def test_different_config_is_refused_and_store_untouched(job, prefect_api, capsys):
    tmp, data, model = job
    assert _extract(tmp, data, model) == 0
    before = tree_hash(tmp / "out.zarr")
    capsys.readouterr()
    rc = main(["extract", "--data", str(data), "--model", f"gmm:{model}", "--out", str(tmp / "out.zarr"),
               "--shard-size", "250", "--batch-size", "100", "--no-progress", "--solver", "rk4", "--steps", "13"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "solver.steps" in err and "12" in err and "13" in err
    assert tree_hash(tmp / "out.zarr") == before


def test_failed_shard_is_recorded_others_done_then_resume(job, prefect_api, capsys, monkeypatch):
    tmp, data, model = job
    assert _extract(tmp, data, model, out="ref.zarr") == 0
    monkeypatch.setenv("PFLATENTS_FAIL_SHARDS", "2")
    log = tmp / "faults.log"
    monkeypatch.setenv("PFLATENTS_FAULT_LOG", str(log))
    rc = _extract(tmp, data, model, extra=["--retries", "1"])
    err = capsys.readouterr().err
    assert rc == 1 and "[2]" in err
    # the injection happened, once: a deterministic failure is not retried
    assert log.read_text().splitlines() == [f"{tmp / 'out.zarr'} 2 permanent"]
    assert "Traceback" not in err and "raise ShardsFailed" not in err   # the flow fails without a traceback
    url = str(tmp / "out.zarr")
    assert main(["status", url, "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert (st["done"], st["failed"], st["pending"]) == (3, 1, 0)
    assert st["failed_shards"][0]["id"] == 2 and "injected" in st["failed_shards"][0]["error"]
    monkeypatch.delenv("PFLATENTS_FAIL_SHARDS")
    assert main(["resume", url, "--no-progress"]) == 0
    ref, out = zarr.open_group(str(tmp / "ref.zarr"), mode="r"), zarr.open_group(url, mode="r")
    np.testing.assert_array_equal(out["latents"][:], ref["latents"][:])
    np.testing.assert_array_equal(out["nfe"][:], ref["nfe"][:])


def test_transient_failure_is_retried(job, prefect_api, monkeypatch):
    tmp, data, model = job
    monkeypatch.setenv("PFLATENTS_FAIL_ONCE", "1")
    log = tmp / "faults.log"
    monkeypatch.setenv("PFLATENTS_FAULT_LOG", str(log))
    assert _extract(tmp, data, model, extra=["--retries", "1"]) == 0
    assert log.read_text().splitlines() == [f"{tmp / 'out.zarr'} 1 transient"]   # it did fail once
    g = zarr.open_group(str(tmp / "out.zarr"), mode="r")
    assert all(g["shards"][f"{i:06d}"].attrs["state"] == "done" for i in range(4))


def test_resume_refuses_changed_data_or_model(job, prefect_api, capsys, monkeypatch):
    tmp, data, model = job
    monkeypatch.setenv("PFLATENTS_FAIL_SHARDS", "0")
    assert _extract(tmp, data, model, extra=["--retries", "0"]) == 1
    monkeypatch.delenv("PFLATENTS_FAIL_SHARDS")
    url = str(tmp / "out.zarr")
    before = tree_hash(tmp / "out.zarr")
    original = np.load(data)
    x = original.copy()
    x[500, 3] += 1.0
    np.save(data, x)
    capsys.readouterr()
    assert main(["resume", url]) == 2
    assert "data" in capsys.readouterr().err and tree_hash(tmp / "out.zarr") == before
    np.save(data, original)
    doc = json.loads(model.read_text())
    doc["means"][0][0] += 0.5
    model.write_text(json.dumps(doc))
    assert main(["resume", url]) == 2
    assert "model" in capsys.readouterr().err and tree_hash(tmp / "out.zarr") == before


def test_dask_local_cluster_runner(job, prefect_api):
    tmp, data, model = job
    assert _extract(tmp, data, model, out="ref.zarr") == 0
    assert _extract(tmp, data, model, extra=["--runner", "dask", "--workers", "2"]) == 0
    ref, out = zarr.open_group(str(tmp / "ref.zarr"), mode="r"), zarr.open_group(str(tmp / "out.zarr"), mode="r")
    np.testing.assert_array_equal(out["latents"][:], ref["latents"][:])
