"""What the pipeline cases share: the GMM jobs they extract (data .npy + model JSON), the bare loop that
encodes a job without Prefect or Zarr, free loopback ports, and real Prefect servers started and stopped."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np

BIN = Path(sys.executable).parent  # the venv's console scripts: pflatents, prefect, dask


def pflatents(*args: str) -> list[str]:
    return [str(BIN / "pflatents"), *args]


def free_port() -> int:
    """A free TCP port on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    """Poll url until it answers 200; TimeoutError after timeout, RuntimeError if proc exits first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout} s")


def start_prefect_server(env: dict, log: Path | None = None, timeout: float = 240,
                         ui: bool = False) -> tuple[subprocess.Popen, str]:
    """A real ``prefect server start`` on a free loopback port in its own session (stop it with ``stop``);
    returns (process, base URL ``http://127.0.0.1:PORT``; the API is under /api)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in env.items() if k != "PREFECT_API_URL"}
    if ui:
        env.update(PREFECT_SERVER_UI_ENABLED="true", PREFECT_UI_API_URL=f"{url}/api")
    out = open(log, "w") if log else subprocess.DEVNULL
    proc = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_http(f"{url}/api/health", timeout, proc)
    except (TimeoutError, RuntimeError) as e:
        stop(proc)
        raise RuntimeError(f"prefect server did not start: {e}" + (f"; see {log}" if log else "")) from None
    return proc, url


def stop(proc: subprocess.Popen, timeout: float = 20) -> None:
    """SIGTERM a process started in its own session (its group), SIGKILL after timeout."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def write_job(d: Path, n: int, dim: int = 64, k: int = 4, seed: int = 0) -> tuple[Path, Path]:
    """A GMM model JSON and n samples drawn from it."""
    rng = np.random.default_rng(seed)
    means = rng.normal(0, 2, (k, dim))
    covs = [(a @ a.T) / dim + 0.1 * np.eye(dim) for a in rng.normal(size=(k, dim, dim))]
    comp = rng.choice(k, n)
    chol = np.linalg.cholesky(np.stack(covs))
    x = means[comp] + np.einsum("nij,nj->ni", chol[comp], rng.normal(size=(n, dim)))
    model = d / "gmm.json"
    model.write_text(json.dumps({"weights": [1 / k] * k, "means": means.tolist(),
                                 "covariances": [c.tolist() for c in covs]}))
    np.save(d / "x.npy", x.astype(np.float32))
    return d / "x.npy", model


def make_job(d: Path, n: int, dim: int = 64, k: int = 8, seed: int = 0) -> tuple[Path, Path]:
    """GMM parameters (JSON) and n samples from it (.npy)."""
    rng = np.random.default_rng(seed)
    means = rng.normal(0, 1.5, (k, dim))
    covs = []
    for _ in range(k):
        q, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
        covs.append((q * rng.uniform(0.05, 1.0, dim)) @ q.T)
    comp = rng.integers(0, k, n)
    chol = np.linalg.cholesky(np.stack(covs))
    x = np.empty((n, dim), dtype=np.float32)
    for c in range(k):
        idx = np.nonzero(comp == c)[0]
        x[idx] = means[c] + rng.normal(size=(idx.size, dim)) @ chol[c].T
    (d / "gmm.json").write_text(json.dumps({"weights": [1.0 / k] * k, "means": means.tolist(),
                                            "covariances": [c.tolist() for c in covs]}))
    np.save(d / "x.npy", x)
    return d / "x.npy", d / "gmm.json"


# The bare loop: the job's batches encoded and np.saved + fsynced, shard by shard, no Prefect, no Zarr
# (argv: data, model, out dir, rk4 steps, batch, shard); prints each shard's seconds.
BARE = r"""
import sys, os, time, numpy as np, torch
from pflatents.tasks.ode.batches import encode_block
from pflatents.tasks.ode.pfode import SolverConfig
from pflatents.tasks.models.scores import GaussianMixtureScore
from pflatents.tasks.ode.sde import VPSDE
data, model, out, steps, batch, shard = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
x = np.load(data, mmap_mode="r")
gmm = GaussianMixtureScore.from_json(model, VPSDE())
for i0 in range(0, len(x), shard):
    t0 = time.perf_counter()
    z, nfe, _ = encode_block(gmm, VPSDE(), np.asarray(x[i0:i0 + shard]), SolverConfig("rk4", steps=steps), batch, torch.device("cpu"))
    with open(f"{out}/z{i0:09d}.npy", "wb") as f:
        np.save(f, z); np.save(f, nfe); f.flush(); os.fsync(f.fileno())
    print(time.perf_counter() - t0, flush=True)
"""
