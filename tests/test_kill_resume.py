"""Kill safety, concurrency and bad input with real `pflatents` subprocesses and real SIGKILL."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time

import numpy as np
import pytest
import torch
import zarr

from extract_helpers import BIN, cli, env_with, no_traceback, tree_hash, write_gmm_job
from pflatents.tasks.ode.batches import encode_block
from pflatents.tasks.ode.pfode import SolverConfig
from pflatents.tasks.models.scores import GaussianMixtureScore
from pflatents.tasks.ode.sde import VPSDE

pytestmark = pytest.mark.slow

SHARD, BATCH, STEPS = 200, 100, 8


def _args(data, model, out, *extra):
    return ["extract", "--data", str(data), "--model", f"gmm:{model}", "--out", str(out), "--shard-size", str(SHARD),
            "--batch-size", str(BATCH), "--solver", "rk4", "--steps", str(STEPS), "--no-progress", *extra]


def _reference(data, model) -> tuple[np.ndarray, np.ndarray]:
    """What an uninterrupted run writes: the same batches through the same code, in-process."""
    x = np.load(data)
    z, nfe, _ = encode_block(GaussianMixtureScore.from_json(model, VPSDE()), VPSDE(), x,
                             SolverConfig("rk4", steps=STEPS), BATCH, torch.device("cpu"))
    return z, nfe


def _states(out) -> list[str | None]:
    try:
        g = zarr.open_group(str(out), mode="r")
        shards = g["shards"]
        n = g.attrs["pflatents"]["n_shards"]
    except Exception:
        return []
    states = []
    for i in range(n):
        node = shards.get(f"{i:06d}")
        states.append(node.attrs.get("state") if node is not None else None)
    return states


def _start(args, env) -> subprocess.Popen:
    return subprocess.Popen([str(BIN / "pflatents"), *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def _wait_for(pred, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process ended early ({proc.returncode}): {proc.stderr.read()[-2000:]}")
        time.sleep(0.05)
    raise AssertionError("condition not reached in time")


def _assert_complete_and_equal(out, ref):
    z, nfe = ref
    g = zarr.open_group(str(out), mode="r")
    np.testing.assert_array_equal(g["latents"][:], z)
    np.testing.assert_array_equal(g["nfe"][:], nfe)
    states = _states(out)
    assert states and all(s == "done" for s in states)
    assert sorted(int(k) for k in g["shards"].group_keys()) == list(range(len(states)))  # one record each


@pytest.mark.parametrize("moment", ["random", "mid_write"])
def test_sigkill_then_resume_is_bit_identical(tmp_path, cli_env, moment):
    data, model = write_gmm_job(tmp_path, n=3000)
    out = tmp_path / "out.zarr"
    pause = "0.3" if moment == "random" else "30"
    proc = _start(_args(data, model, out), env_with(cli_env, PFLATENTS_PAUSE_IN_WRITE=pause))
    try:
        if moment == "random":
            _wait_for(lambda: _states(out).count("done") >= 2, 240, proc)
            time.sleep(random.Random(os.getpid()).uniform(0.0, 0.6))
        else:  # a shard's latents chunk is written, its nfe and done record are not
            _wait_for(lambda: "writing" in _states(out), 240, proc)
            time.sleep(1.0)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    assert proc.returncode == -signal.SIGKILL
    states = _states(out)
    assert 0 < states.count("done") < len(states) or moment == "mid_write"
    assert states.count("done") < len(states)
    res = cli(["resume", str(out), "--no-progress"], env=cli_env)
    assert res.returncode == 0, res.stderr[-3000:]
    _assert_complete_and_equal(out, _reference(data, model))


def test_second_process_on_same_store_refuses(tmp_path, cli_env):
    data, model = write_gmm_job(tmp_path, n=2000)
    out = tmp_path / "out.zarr"
    env = env_with(cli_env, PFLATENTS_PAUSE_IN_WRITE="1.5")
    a = _start(_args(data, model, out), env)
    try:
        _wait_for(lambda: "done" in _states(out), 240, a)
        b = cli(_args(data, model, out), env=env)
        assert b.returncode == 2
        assert "lock" in b.stderr.lower() and str(a.pid) in b.stderr and no_traceback(b.stderr)
        assert a.wait(300) == 0, a.stderr.read()[-3000:]
    finally:
        if a.poll() is None:
            os.killpg(a.pid, signal.SIGKILL)
    _assert_complete_and_equal(out, _reference(data, model))


def test_two_processes_started_at_once(tmp_path, cli_env):
    data, model = write_gmm_job(tmp_path, n=2000)
    out = tmp_path / "out.zarr"
    env = env_with(cli_env, PFLATENTS_PAUSE_IN_WRITE="0.5")
    procs = [_start(_args(data, model, out), env) for _ in range(2)]
    rcs = sorted(p.wait(300) for p in procs)
    errs = [p.stderr.read() for p in procs]
    assert rcs == [0, 2], errs
    assert any("lock" in e.lower() for e in errs)
    _assert_complete_and_equal(out, _reference(data, model))


def test_bad_input_is_two_plain_lines_and_nothing_written(tmp_path, cli_env):
    data, model = write_gmm_job(tmp_path, n=500)
    x = np.load(data)
    x[[7, 42], 1] = np.nan
    bad = tmp_path / "nan.npy"
    np.save(bad, x)
    res = cli(_args(bad, model, tmp_path / "o.zarr"), env=cli_env)
    assert res.returncode == 2 and no_traceback(res.stderr)
    assert "7" in res.stderr and "42" in res.stderr and len(res.stderr.strip().splitlines()) <= 2
    assert not (tmp_path / "o.zarr").exists()
    # --out pointing at something that is not a pflatents store is left intact
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("keep me")
    before = tree_hash(foreign)
    res = cli(_args(data, model, foreign), env=cli_env)
    assert res.returncode == 2 and no_traceback(res.stderr) and "foreign" in res.stderr
    assert tree_hash(foreign) == before


def test_sigkills_at_random_moments_then_resume_each_time_bit_identical(tmp_path, cli_env):
    """Kill a multi-shard extract (then each resume) at random moments inside the integration window;
    every resume continues, and the finished store equals an uninterrupted run bit for bit."""
    data, model = write_gmm_job(tmp_path, n=3000)                  # 15 shards
    out = tmp_path / "out.zarr"
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    env = env_with(cli_env, PFLATENTS_PAUSE_IN_WRITE="0.2")
    kills = 0
    for attempt in range(4):
        done_before = _states(out).count("done")
        args = _args(data, model, out) if attempt == 0 else ["resume", str(out), "--no-progress"]
        proc = _start(args, env)
        try:
            # inside the integration window: a shard of this run has started (a record moved on)
            _wait_for(lambda: _states(out).count("done") > done_before or "writing" in _states(out), 240, proc)
            time.sleep(rng.uniform(0.0, 1.0))
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
        kills += proc.returncode == -signal.SIGKILL
        if _states(out).count("done") == len(_states(out)):
            break
    assert kills >= 2, f"seed {seed}: the runs ended before they could be killed"
    res = cli(["resume", str(out), "--no-progress"], env=cli_env)
    assert res.returncode == 0, f"seed {seed}: {res.stderr[-3000:]}"
    _assert_complete_and_equal(out, _reference(data, model))


def test_sigkill_inside_a_growth_step_then_extract_again(tmp_path, cli_env):
    """Kill an incremental run after its arrays grew and before the plan names the new size; the
    next run grows again and the store equals one grown without a kill, bit for bit."""
    data, model = write_gmm_job(tmp_path, n=1000)
    x = np.load(data)
    folder, out = tmp_path / "incoming", tmp_path / "inc.zarr"
    folder.mkdir()
    np.save(folder / "000.npy", x[:500])
    args = _args(f"npydir:{folder}", model, out)
    first = cli(args, env=cli_env)
    assert first.returncode == 0, first.stderr[-3000:]
    np.save(folder / "001.npy", x[500:])
    proc = _start(args, env_with(cli_env, PFLATENTS_PAUSE_IN_GROW="60"))

    def arrays_grown() -> bool:
        try:
            return zarr.open_array(str(out / "latents"), mode="r").shape[0] == 1000
        except Exception:
            return False

    try:
        _wait_for(arrays_grown, 240, proc)
        attrs = zarr.open_group(str(out), mode="r").attrs["pflatents"]
        assert (attrs["n_planned"], attrs["n_samples"]) == (500, 500)   # the plan is not grown yet
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    assert proc.returncode == -signal.SIGKILL
    res = cli(args, env=cli_env)
    assert res.returncode == 0, res.stderr[-3000:]
    attrs = zarr.open_group(str(out), mode="r").attrs["pflatents"]
    assert (attrs["n_planned"], attrs["n_samples"]) == (1000, 1000)
    _assert_complete_and_equal(out, _reference(data, model))
