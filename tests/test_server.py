"""`pflatents server start|stop|status`: a managed local Prefect server that commands find by themselves."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import psutil
import pytest

from extract_helpers import cli, write_gmm_job

pytestmark = pytest.mark.integration


def _env(home) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_PROFILE")}
    env.update(PREFECT_HOME=str(home), PYTHONUNBUFFERED="1")
    return env


@pytest.mark.timeout(900)
def test_start_use_status_stop(tmp_path):
    env = _env(tmp_path / "home")
    res = cli(["server", "start"], env=env, timeout=300)   # the starting process exits; the server stays
    assert res.returncode == 0 and "Prefect server started: http://127.0.0.1:" in res.stdout, res.stderr
    st = json.loads((tmp_path / "home" / "pflatents-server.json").read_text())
    try:
        assert psutil.pid_exists(st["pid"]) and os.getpgid(st["pid"]) == st["pid"]  # its own session
        status = cli(["server", "status", "--json"], env=env)
        assert status.returncode == 0 and json.loads(status.stdout)["url"] == st["url"]
        again = cli(["server", "start"], env=env)
        assert again.returncode == 0 and "already running" in again.stdout

        probe = ("import os; from pflatents.flows.server import prefect_env; prefect_env(); "
                 "print(os.environ['PREFECT_API_URL'])")
        out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
        assert out.stdout.strip() == st["url"]

        data, model = write_gmm_job(tmp_path, n=300)
        ext = cli(["extract", "--data", str(data), "--model", f"gmm:{model}", "--out", str(tmp_path / "o.zarr"),
                   "--solver", "rk4", "--steps", "4", "--no-progress"], env=env)
        assert ext.returncode == 0 and "done: 300 samples" in ext.stdout, ext.stderr
        assert "server start" not in ext.stderr  # no note: it used the managed server
        from prefect.client.orchestration import get_client
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings(updates={PREFECT_API_URL: st["url"]}), get_client(sync_client=True) as client:
            assert any(r.state.is_completed() for r in client.read_flow_runs())  # the run went to this server
    finally:
        stop = cli(["server", "stop"], env=env, timeout=120)
    assert stop.returncode == 0 and "stopped" in stop.stdout
    assert not psutil.pid_exists(st["pid"]) or psutil.Process(st["pid"]).status() == psutil.STATUS_ZOMBIE
    assert not (tmp_path / "home" / "pflatents-server.json").exists()
    gone = cli(["server", "status"], env=env)
    assert gone.returncode == 1 and "not running" in gone.stdout


def test_a_stale_record_is_not_a_server(tmp_path):
    """A recorded pid that is not the server (dead, or reused) counts as not running; stop clears it."""
    home = tmp_path / "home"
    home.mkdir()
    me = psutil.Process()
    (home / "pflatents-server.json").write_text(json.dumps({
        "pid": me.pid, "create_time": me.create_time() - 100, "port": 1, "url": "http://127.0.0.1:1/api",
        "log": str(home / "pflatents-server.log"), "started": "-"}))
    env = _env(home)
    res = cli(["server", "status"], env=env)
    assert res.returncode == 1 and "not running" in res.stdout
    probe = "import os; from pflatents.flows.server import prefect_env; prefect_env(); print(os.environ.get('PREFECT_API_URL'))"
    assert subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True).stdout.strip() == "None"
    stop = cli(["server", "stop"], env=env)
    assert stop.returncode == 0 and "was not running" in stop.stdout and psutil.pid_exists(me.pid)
    assert not (home / "pflatents-server.json").exists()


@pytest.mark.slow
def test_without_a_server_the_first_line_says_how_to_save_the_start_up(tmp_path):
    data, model = write_gmm_job(tmp_path, n=100)
    res = cli(["extract", "--data", str(data), "--model", f"gmm:{model}", "--out", str(tmp_path / "o.zarr"),
               "--solver", "rk4", "--steps", "4", "--no-progress"], env=_env(tmp_path / "home"), timeout=400)
    assert res.returncode == 0, res.stderr
    assert res.stderr.splitlines()[0].startswith("pflatents: no Prefect server configured")
    assert "`pflatents server start`" in res.stderr.splitlines()[0]


def test_port_taken_is_a_clear_error(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        res = cli(["server", "start", "--port", str(port)], env=_env(tmp_path / "home"))
    assert res.returncode == 2 and f"port {port}" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "home" / "pflatents-server.json").exists()
