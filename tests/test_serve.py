"""`pflatents serve` against a real `prefect server start`: scheduled incremental runs, failures, retries."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import numpy as np
import pytest
import torch
import zarr

from extract_helpers import BIN, cli, env_with, write_gmm_job
from pflatents.storage import LatentStore
from pflatents.tasks.ode.batches import encode_block
from pflatents.tasks.ode.pfode import SolverConfig
from pflatents.tasks.models.scores import GaussianMixtureScore
from pflatents.tasks.ode.sde import VPSDE

pytestmark = pytest.mark.slow

NAME = "serve-test"


def _runs(api: str) -> list:
    """Finished runs of the served deployment, oldest first."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        runs = client.read_flow_runs(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[NAME])))
    done = [r for r in runs if r.state is not None and r.state.is_final()]
    return sorted(done, key=lambda r: r.end_time)


def _wait_run(api: str, pred, proc, timeout: float = 240):
    """The first finished run after those already seen that satisfies ``pred``."""
    seen = {r.id for r in _runs(api)}
    deadline = time.time() + timeout
    while time.time() < deadline:
        for r in _runs(api):
            if r.id not in seen and pred(r):
                return r
        assert proc.poll() is None, f"serve exited with {proc.returncode}"
        time.sleep(1)
    raise AssertionError(f"no matching run within {timeout} s; runs: {[(r.state.type, r.state.message) for r in _runs(api)]}")


def _save(folder, name, x):
    """Write a new file the way producers should: a temporary name, then an atomic rename."""
    np.save(folder / f".{name}.tmp.npy", x)
    os.replace(folder / f".{name}.tmp.npy", folder / name)


def test_serve_without_server_says_how_to_start_one(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    res = cli(["serve", "--data", "x.npy", "--model", "gmm:m.json", "--out", str(tmp_path / "o.zarr"),
               "--interval", "5"], env=env, timeout=120)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "prefect server start" in res.stderr and "export PREFECT_API_URL=" in res.stderr


def test_scheduled_runs_fail_retry_and_extract_only_new_samples(tmp_path, cli_env, prefect_server):
    data, model = write_gmm_job(tmp_path, n=1000)
    x = np.load(data)
    folder, out, fail = tmp_path / "incoming", tmp_path / "inc.zarr", tmp_path / "fail.txt"
    folder.mkdir()
    _save(folder, "000.npy", x[:600])
    fail.write_text("1")   # shard 1 fails while this file exists
    env = env_with(cli_env, PFLATENTS_FAIL_SHARDS_FILE=str(fail))
    proc = subprocess.Popen([str(BIN / "pflatents"), "serve", "--data", f"npydir:{folder}", "--model", f"gmm:{model}",
                             "--out", str(out), "--interval", "3", "--name", NAME, "--solver", "rk4", "--steps", "6",
                             "--shard-size", "300", "--batch-size", "100", "--retries", "0"],
                            env=env, stdout=open(tmp_path / "serve.log", "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        failed = _wait_run(prefect_server, lambda r: True, proc)
        assert failed.state.is_failed() and "[1]" in failed.state.message, failed.state.message
        store = LatentStore.open(out, mode="r")
        assert store.shard_record(1)["state"] == "failed" and store.shard_record(0)["state"] == "done"
        assert store.n_samples == 0  # nothing published while a shard of the plan is not done
        fail.unlink()

        retried = _wait_run(prefect_server, lambda r: r.state.is_completed() and "extracted" in r.state.message, proc)
        assert "retried first: [1]" in retried.state.message and "(600 new)" in retried.state.message
        first = {i: LatentStore.open(out, mode="r").shard_record(i) for i in (0, 1)}
        assert LatentStore.open(out, mode="r").n_samples == 600

        _save(folder, "001.npy", x[600:])
        grown = _wait_run(prefect_server, lambda r: r.state.is_completed() and "extracted" in r.state.message, proc)
        assert "extracted 400 samples (400 new) in shards [2, 3]" in grown.state.message, grown.state.message
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
    store = LatentStore.open(out, mode="r")
    assert (store.n_samples, store.pending_shards()) == (1000, [])
    assert {i: store.shard_record(i) for i in (0, 1)} == first           # the old shards were not touched
    assert store.shard_record(2)["pid"] != first[1]["pid"]                 # each run is its own process
    z, nfe, _ = encode_block(GaussianMixtureScore.from_json(model, VPSDE()), VPSDE(), x,
                             SolverConfig("rk4", steps=6), 100, torch.device("cpu"))
    np.testing.assert_array_equal(zarr.open_group(str(out), mode="r")["latents"][:], z)
