"""Bad input to `pflatents extract`: exit 2, a plain message naming the problem, nothing written."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from extract_helpers import write_gmm_job
from pflatents.flows.cli import main


@pytest.fixture
def job(tmp_path):
    data, model = write_gmm_job(tmp_path, n=300)
    return tmp_path, data, model


def _run(capsys, tmp, data, model, *extra, out="o.zarr"):
    rc = main(["extract", "--data", str(data), "--model", str(model), "--out", str(tmp / out), "--no-progress",
               "--solver", "rk4", "--steps", "4", *extra])
    err = capsys.readouterr().err
    return rc, err


def _check(rc, err, tmp, *words, out="o.zarr"):
    assert rc == 2, err
    assert err.startswith("pflatents: error:") and len(err.strip().splitlines()) <= 2
    for w in words:
        assert w in err, (w, err)
    assert not (tmp / out).exists()


def test_missing_data_file(job, capsys):
    tmp, _, model = job
    rc, err = _run(capsys, tmp, tmp / "nope.npy", f"gmm:{model}")
    _check(rc, err, tmp, "nope.npy")


def test_missing_model_file(job, capsys):
    tmp, data, _ = job
    rc, err = _run(capsys, tmp, data, f"gmm:{tmp / 'nope.json'}")
    _check(rc, err, tmp, "nope.json")


def test_malformed_model_json(job, capsys):
    tmp, data, model = job
    model.write_text("{not json")
    rc, err = _run(capsys, tmp, data, f"gmm:{model}")
    _check(rc, err, tmp, "JSON")


def test_integer_data_refused(job, capsys):
    tmp, _, model = job
    np.save(tmp / "ints.npy", np.arange(300 * 8, dtype=np.int64).reshape(300, 8))
    rc, err = _run(capsys, tmp, tmp / "ints.npy", f"gmm:{model}")
    _check(rc, err, tmp, "int64")


def test_shape_mismatch(job, capsys):
    tmp, _, model = job
    np.save(tmp / "d5.npy", np.zeros((10, 5), dtype=np.float32))
    rc, err = _run(capsys, tmp, tmp / "d5.npy", f"gmm:{model}")
    _check(rc, err, tmp, "(5,)", "8")


def test_empty_dataset(job, capsys):
    tmp, _, model = job
    np.save(tmp / "empty.npy", np.zeros((0, 8), dtype=np.float32))
    rc, err = _run(capsys, tmp, tmp / "empty.npy", f"gmm:{model}")
    _check(rc, err, tmp, "empty")


@pytest.mark.parametrize("flag", ["--shard-size", "--batch-size"])
def test_sizes_below_one(job, capsys, flag):
    tmp, data, model = job
    rc, err = _run(capsys, tmp, data, f"gmm:{model}", flag, "0")
    _check(rc, err, tmp, flag.strip("-").replace("-", " "), "0")


def test_unknown_solver_and_bad_tolerance(job, capsys):
    tmp, data, model = job
    rc = main(["extract", "--data", str(data), "--model", f"gmm:{model}", "--out", str(tmp / "o.zarr"),
               "--solver", "magic"])
    _check(rc, capsys.readouterr().err, tmp, "magic")
    rc = main(["extract", "--data", str(data), "--model", f"gmm:{model}", "--out", str(tmp / "o.zarr"),
               "--rtol", "-1"])
    _check(rc, capsys.readouterr().err, tmp, "rtol", "-1")


def test_t_eps_outside_range(job, capsys):
    tmp, data, model = job
    rc, err = _run(capsys, tmp, data, f"gmm:{model}", "--t-eps", "1.5")
    _check(rc, err, tmp, "t_eps", "1.5")


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_output(job, capsys):
    tmp, data, model = job
    ro = tmp / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    rc, err = _run(capsys, tmp, data, f"gmm:{model}", out="ro/o.zarr")
    assert rc == 2 and "ro" in err


def test_output_under_a_file_is_refused(job, capsys):
    tmp, data, model = job
    (tmp / "afile").write_text("x")
    rc, err = _run(capsys, tmp, data, f"gmm:{model}", out="afile/o.zarr")
    assert rc == 2 and "afile" in err and err.startswith("pflatents: error:")
    assert (tmp / "afile").read_text() == "x"


def test_pickle_model_refused(job, capsys):
    tmp, data, _ = job
    rc, err = _run(capsys, tmp, data, f"gmm:{tmp / 'm.pt'}")
    assert rc == 2
    rc, err = _run(capsys, tmp, data, f"ckpt:{tmp / 'm.pt'}")
    _check(rc, err, tmp, "pickle")


def test_status_of_non_store(tmp_path, capsys):
    (tmp_path / "x").mkdir()
    assert main(["status", str(tmp_path / "x")]) == 2
    assert "pflatents" in capsys.readouterr().err


def test_config_json_is_plain(job, capsys, prefect_api):
    """The pinned config in attrs is plain JSON (numpy scalars converted)."""
    tmp, data, model = job
    rc = main(["extract", "--data", str(data), "--model", f"gmm:{model}", "--out", str(tmp / "o.zarr"),
               "--no-progress", "--solver", "rk4", "--steps", "4"])
    assert rc == 0
    doc = json.loads((tmp / "o.zarr" / "zarr.json").read_text())
    assert doc["attributes"]["pflatents"]["config"]["shard_size"] == 300


def test_console_script_exit_codes(tmp_path, cli_env):
    """The installed `pflatents` (which skips the interpreter's teardown) keeps main's exit codes:
    1 naming the failed shard (Prefect's task-run log only with --debug), 0 after resume, 2 for bad
    input without a traceback."""
    from extract_helpers import cli, env_with, no_traceback

    data, model = write_gmm_job(tmp_path, n=600, dim=4)
    out = tmp_path / "o.zarr"
    args = ["extract", "--data", str(data), "--model", f"gmm:{model}", "--out", str(out), "--solver", "rk4",
            "--steps", "4", "--shard-size", "200", "--no-progress"]
    res = cli(args, env=env_with(cli_env, PFLATENTS_FAIL_SHARDS="1"))
    assert res.returncode == 1, res.stderr[-2000:]
    assert "[1]" in res.stderr and "resume" in res.stderr
    assert no_traceback(res.stderr) and "Task run" not in res.stderr, res.stderr  # the summary, what to do
    res = cli(["--debug", *args], env=env_with(cli_env, PFLATENTS_FAIL_SHARDS="1"))
    assert res.returncode == 1 and "Task run 'integrate shard 1'" in res.stderr  # --debug shows Prefect's run log
    res = cli(["resume", str(out), "--no-progress"], env=cli_env)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "done: 200 samples" in res.stdout
    res = cli(["extract", "--data", str(tmp_path / "missing.npy"), "--model", f"gmm:{model}", "--out",
               str(tmp_path / "m.zarr")], env=cli_env)
    assert res.returncode == 2 and no_traceback(res.stderr) and "missing.npy" in res.stderr
