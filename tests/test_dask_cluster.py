"""Extraction through a real dask.distributed cluster: `dask scheduler` + `dask worker` processes on loopback."""

from __future__ import annotations

import os
import signal
import subprocess

import numpy as np
import pytest
import zarr

from conftest import free_port, wait_http
from extract_helpers import BIN, cli, write_gmm_job

pytestmark = pytest.mark.slow


@pytest.fixture
def dask_cluster(cli_env, tmp_path):
    """A scheduler and one worker (declaring a GPU resource) as real processes; yields the address."""
    port, dash = free_port(), free_port()
    env = dict(cli_env)
    procs = [subprocess.Popen([str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port),
                               "--dashboard-address", f"127.0.0.1:{dash}"],
                              env=env, stdout=subprocess.DEVNULL, stderr=open(tmp_path / "sched.log", "w"),
                              start_new_session=True)]
    try:
        wait_http(f"http://127.0.0.1:{dash}/health", 120, procs[0])
        procs.append(subprocess.Popen([str(BIN / "dask"), "worker", f"tcp://127.0.0.1:{port}", "--nthreads", "1",
                                       "--nworkers", "1", "--resources", "GPU=1", "--no-dashboard",
                                       "--host", "127.0.0.1"],
                                      env=env, stdout=subprocess.DEVNULL, stderr=open(tmp_path / "worker.log", "w"),
                                      start_new_session=True))
        yield f"127.0.0.1:{port}", procs
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)


def test_extract_on_existing_dask_cluster(tmp_path, cli_env, dask_cluster):
    address, procs = dask_cluster
    data, model = write_gmm_job(tmp_path, n=800)
    common = ["--data", str(data), "--model", f"gmm:{model}", "--shard-size", "200", "--batch-size", "100",
              "--solver", "rk4", "--steps", "6", "--no-progress"]
    res = cli(["extract", *common, "--out", str(tmp_path / "d.zarr"), "--runner", f"dask://{address}"], env=cli_env)
    assert res.returncode == 0, res.stderr[-3000:]
    ref = cli(["extract", *common, "--out", str(tmp_path / "r.zarr")], env=cli_env)
    assert ref.returncode == 0, ref.stderr[-3000:]
    d, r = zarr.open_group(str(tmp_path / "d.zarr"), mode="r"), zarr.open_group(str(tmp_path / "r.zarr"), mode="r")
    np.testing.assert_array_equal(d["latents"][:], r["latents"][:])
    # the shards were written by the (still running) dask worker process, not by the CLI that has exited
    writer_pids = {d["shards"][k].attrs["pid"] for k in d["shards"].group_keys()}
    assert len(writer_pids) == 1
    os.kill(writer_pids.pop(), 0)  # raises if that process is gone, i.e. if the CLI had written the shards
    assert procs[1].poll() is None
