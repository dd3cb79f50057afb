"""The --latent-tol pilot as a visible step of the job, through the real CLI and a real Prefect server:
a task run of the extract flow (``pilot: latent-tol 0.001``) that pins its choice before any shard runs,
with a progress row; resume and a repeated extract reuse the pinned choice; ``status`` shows the curve."""

from __future__ import annotations

import json
import uuid

import numpy as np
import torch
import zarr

from extract_helpers import cli, env_with, no_traceback
from problems import gaussian
from pflatents.tasks.config import solver_from_dict
from pflatents.tasks.models.scores import GaussianMixtureScore
from pflatents.tasks.ode.batches import encode_block
from pflatents.tasks.ode.sde import VPSDE
from test_dashboard import api, flow_run_of, logs_of, user_env


def _tasks(url: str, run: dict) -> list[dict]:
    return api(url, "/task_runs/filter", {"flow_runs": {"id": {"any_": [run["id"]]}}})


def test_pilot_is_a_task_run_pinned_before_the_shards_and_not_rerun(tmp_path, cli_env, prefect_server):
    g = gaussian(d=4, seed=0, lam_lo=1e-3, lam_hi=1.0)
    data, model = tmp_path / "x.npy", tmp_path / "g.json"
    np.save(data, g.sample(600, seed=5).astype(np.float32))
    model.write_text(json.dumps({"weights": [1.0], "means": [g.mu.tolist()], "covariances": [g.cov.tolist()]}))
    name = f"pilot-{uuid.uuid4().hex[:8]}.zarr"
    out = tmp_path / name
    args = ["extract", "--data", str(data), "--model", f"gmm:{model}", "--out", str(out), "--latent-tol", "1e-3",
            "--t-eps", "1e-3", "--shard-size", "200", "--shards-per-task", "1"]
    # progress on (--json puts the outcome on stdout, the bars on stderr); shard 2 fails: resume has work
    cli_env = user_env(cli_env)  # INFO logs reach the server, as for a user
    res = cli([*args, "--json"], env=env_with(cli_env, PFLATENTS_FAIL_SHARDS="2"))
    assert res.returncode == 1 and no_traceback(res.stderr), res.stderr[-3000:]
    assert "pilot: latent-tol 0.001" in res.stderr and "encoding" in res.stderr  # the pilot's progress row
    assert "chose " in res.stderr  # the pilot's line (notes go to stderr with --json)

    run = flow_run_of(prefect_server, name)
    tasks = sorted(_tasks(prefect_server, run), key=lambda t: t["start_time"])
    assert [t["name"] for t in tasks][0] == "pilot: latent-tol 0.001"
    assert sorted(t["name"] for t in tasks[1:]) == ["integrate shard 0", "integrate shard 1", "integrate shard 2"]
    assert tasks[0]["state_type"] == "COMPLETED" and tasks[0]["end_time"] <= min(t["start_time"] for t in tasks[1:])
    assert any("chose " in m for m in logs_of(prefect_server, run["id"], "chose "))

    cfg = zarr.open_group(str(out), mode="r").attrs["pflatents"]["config"]
    rec = cfg["pilot"]
    assert rec["state"] == "done" and rec["met"] and cfg["solver"] == rec["choice"]
    chosen = next(r for r in rec["curve"] if r.get("chosen"))
    assert chosen["held"]["p99"] <= 1e-3

    # resume: the pinned choice, no pilot task run
    res = cli(["resume", str(out), "--no-progress"], env=cli_env)
    assert res.returncode == 0, res.stderr[-3000:]
    run = flow_run_of(prefect_server, name)
    assert [t["name"] for t in _tasks(prefect_server, run)] == ["integrate shard 2"]
    assert zarr.open_group(str(out), mode="r").attrs["pflatents"]["config"] == cfg
    # the same extract again: the pinned choice is reused (nothing to do), the config unchanged
    res = cli([*args, "--no-progress"], env=cli_env)
    assert res.returncode == 0 and "nothing to do" in res.stdout, res.stderr[-3000:]
    assert zarr.open_group(str(out), mode="r").attrs["pflatents"]["config"] == cfg

    # the latents are the chosen setting's, bitwise (the same batches through the same code)
    sde = VPSDE()
    z, _, _ = encode_block(GaussianMixtureScore.from_json(model, sde), sde, np.load(data),
                           solver_from_dict(cfg["solver"]), cfg["batch_size"], torch.device("cpu"))
    np.testing.assert_array_equal(zarr.open_group(str(out), mode="r")["latents"][:], z)

    # status shows the pilot's line and its curve
    res = cli(["status", str(out)], env=cli_env)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert any(ln.startswith("pilot    latent-tol 0.001: pilot (") for ln in lines), res.stdout
    head = next(i for i, ln in enumerate(lines) if "fit p99" in ln and "held p99" in ln and "family" in ln)
    assert "each family's cheapest setting with fit p99 <= target / 2" in lines[head - 1]
    table = lines[head + 1:]
    assert sum(ln.startswith("  * ") for ln in table) == 1 and len(table) >= 3
    assert '"curve"' not in res.stdout  # the config line leaves the curve to the table


def test_resume_runs_a_pilot_that_never_ran(tmp_path, cli_env, prefect_server):
    """A store created with --latent-tol whose run died before its pilot finished (its pilot record still
    pending): `resume` runs the pilot first, then the shards with its choice."""
    from pflatents.flows.coordinator import Job, make_store, prepare

    g = gaussian(d=4, seed=0, lam_lo=1e-3, lam_hi=1.0)
    data, model = tmp_path / "x.npy", tmp_path / "g.json"
    np.save(data, g.sample(300, seed=5).astype(np.float32))
    model.write_text(json.dumps({"weights": [1.0], "means": [g.mu.tolist()], "covariances": [g.cov.tolist()]}))
    name = f"pending-{uuid.uuid4().hex[:8]}.zarr"
    out = tmp_path / name
    p = prepare(Job(data=str(data), model=f"gmm:{model}", out=str(out), t_eps=1e-3, latent_tol=1e-4).resolved())
    make_store(p)  # what the coordinator leaves when killed before the pilot task ends
    assert zarr.open_group(str(out), mode="r").attrs["pflatents"]["config"]["pilot"]["state"] == "pending"
    res = cli(["resume", str(out), "--no-progress"], env=cli_env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "latent-tol 0.0001: pilot (" in res.stdout
    run = flow_run_of(prefect_server, name)
    names = [t["name"] for t in _tasks(prefect_server, run)]
    assert "pilot: latent-tol 0.0001" in names and any(n.startswith("integrate shard") for n in names)
    cfg = zarr.open_group(str(out), mode="r").attrs["pflatents"]["config"]
    assert cfg["pilot"]["state"] == "done" and cfg["solver"] == cfg["pilot"]["choice"]
