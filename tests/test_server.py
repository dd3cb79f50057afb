"""The local Prefect server's lifecycle: the shared server (started on first use, shared by concurrent
commands, stopped when idle or by `pflatents server stop`, a stale record replaced), a command's own
server (PFLATENTS_SERVER=off) that dies with the command even on SIGKILL, and `server start --ui`.

Every test runs on its own PREFECT_HOME under tmp_path and stops what it starts; processes are found
by a marker in their environment (every process a command starts inherits it)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import urllib.request
import uuid

import psutil
import pytest

from extract_helpers import BIN, cli, write_gmm_job

pytestmark = pytest.mark.integration


def _env(home, mode: str = "shared", **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_PROFILE")}
    env.update(PREFECT_HOME=str(home), PYTHONUNBUFFERED="1", PFLATENTS_SERVER=mode,
               PFLATENTS_TEST_MARKER=uuid.uuid4().hex, **extra)
    return env


def marked(env: dict) -> list[psutil.Process]:
    """Live (not zombie) processes whose environment carries this env's marker."""
    out = []
    for p in psutil.process_iter():
        try:
            if p.environ().get("PFLATENTS_TEST_MARKER") == env["PFLATENTS_TEST_MARKER"] and \
                    p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.Error:
            pass
    return out


def gone_within(env: dict, seconds: float) -> list[psutil.Process]:
    """Wait up to ``seconds`` for every marked process to end; returns those still alive."""
    deadline = time.monotonic() + seconds
    while (left := marked(env)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def cleanup(env: dict) -> None:
    """Stop the shared server of this PREFECT_HOME and anything else this test's marker names."""
    cli(["server", "stop"], env=env, timeout=120)
    for p in marked(env):
        p.kill()


def record(home) -> dict:
    return json.loads((home / "pflatents-server.json").read_text())


def extract_args(tmp_path, data, model, name: str, steps: int = 4) -> list[str]:
    return ["extract", "--data", str(data), "--model", f"gmm:{model}", "--out", str(tmp_path / name),
            "--solver", "rk4", "--steps", str(steps), "--no-progress"]


def flow_runs(url: str) -> list:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: url}), get_client(sync_client=True) as client:
        return client.read_flow_runs()


@pytest.mark.timeout(900)
def test_start_use_status_stop(tmp_path):
    home = tmp_path / "home"
    env = _env(home)
    try:
        res = cli(["server", "start"], env=env, timeout=300)   # the starting process exits; the server stays
        assert res.returncode == 0 and "Prefect server started: http://127.0.0.1:" in res.stdout, res.stderr
        st = record(home)
        assert psutil.pid_exists(st["pid"]) and os.getpgid(st["pid"]) == st["pid"]  # its own session
        assert st["idle"] == 0 and st["database"] == str(home / "prefect.db")
        status = cli(["server", "status"], env=env)
        assert status.returncode == 0, status.stdout
        for part in (st["url"], f"pid {st['pid']}", f"port {st['port']}", str(home / "prefect.db"),
                     "stops only with `pflatents server stop`", "dashboard: off"):
            assert part in status.stdout, (part, status.stdout)
        again = cli(["server", "start"], env=env)
        assert again.returncode == 0 and "already running" in again.stdout

        data, model = write_gmm_job(tmp_path, n=300)
        ext = cli(extract_args(tmp_path, data, model, "o.zarr"), env=env)
        assert ext.returncode == 0 and "done: 300 samples" in ext.stdout, ext.stderr
        assert "started a local Prefect server" not in ext.stderr  # it used the running one
        assert any(r.state.is_completed() for r in flow_runs(st["url"]))  # the run went to this server
        assert [p.pid for p in marked(env)] == [st["pid"]]  # the command left nothing else behind
    finally:
        stop = cli(["server", "stop"], env=env, timeout=120)
    assert stop.returncode == 0 and "stopped" in stop.stdout
    assert gone_within(env, 10) == []
    assert not (home / "pflatents-server.json").exists()
    gone = cli(["server", "status"], env=env)
    assert gone.returncode == 1 and "not running" in gone.stdout


@pytest.mark.timeout(900)
def test_first_use_starts_a_shared_server_that_stops_when_idle(tmp_path):
    """No server, no PREFECT_API_URL: the first command starts the shared server, the next one reuses it
    and holds it past the idle period while it runs; SIGKILLed, its lease is dropped and the server
    stops by itself once idle."""
    home = tmp_path / "home"
    env = _env(home, PFLATENTS_SERVER_IDLE="120")
    data, model = write_gmm_job(tmp_path, n=300)
    try:
        first = cli(extract_args(tmp_path, data, model, "a.zarr"), env=env)
        assert first.returncode == 0 and "done: 300 samples" in first.stdout, first.stderr
        assert first.stderr.splitlines()[0].startswith("pflatents: started a local Prefect server"), first.stderr
        st = record(home)
        assert f"at {st['url']}" in first.stderr and st["idle"] == 120
        status = cli(["server", "status"], env=env)
        assert status.returncode == 0 and "unless a command uses it (idle limit 120 s)" in status.stdout

        err = open(tmp_path / "second.err", "w")
        second = subprocess.Popen([str(BIN / "pflatents"), *extract_args(tmp_path, data, model, "b.zarr")],
                                  env={**env, "PFLATENTS_PAUSE_IN_WRITE": "60"}, stdout=subprocess.DEVNULL, stderr=err)
        lease = home / "pflatents-server.leases" / str(second.pid)
        deadline = time.monotonic() + 120
        while not lease.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert lease.exists()
        assert "in use by 1 command" in cli(["server", "status"], env=env).stdout
        short = cli(["server", "start", "--idle", "2"], env=env)  # a shorter idle period, on the running server
        assert short.returncode == 0 and "already running" in short.stdout and record(home)["idle"] == 2
        time.sleep(6)  # three idle periods: the second command's lease holds the server up
        assert psutil.Process(st["pid"]).is_running() and record(home)["pid"] == st["pid"]
        second.kill()   # SIGKILL in the middle of its flow
        second.wait()
        err.close()
        assert "started a local Prefect server" not in (tmp_path / "second.err").read_text()  # it reused it
        left = gone_within(env, 2 + 5 + 10)  # idle period + the server's poll + 10 s
        assert left == [], [p.cmdline() for p in left]
        assert not (home / "pflatents-server.json").exists() and not lease.exists()
    finally:
        cleanup(env)


@pytest.mark.timeout(900)
def test_two_commands_at_once_share_one_server(tmp_path):
    home = tmp_path / "home"
    env = _env(home)
    data, model = write_gmm_job(tmp_path, n=300)
    try:
        procs = [subprocess.Popen([str(BIN / "pflatents"), *extract_args(tmp_path, data, model, f"o{i}.zarr")],
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for i in range(2)]
        outs = [p.communicate(timeout=600) for p in procs]
        for p, (out, err) in zip(procs, outs):
            assert p.returncode == 0 and "done: 300 samples" in out, err
        assert sum("started a local Prefect server" in err for _, err in outs) == 1
        st = record(home)
        servers = [p for p in marked(env) if "pflatents.flows.server" in " ".join(p.cmdline())]
        assert [p.pid for p in servers] == [st["pid"]]   # one server ever ran: the recorded one
        runs = flow_runs(st["url"])
        assert sum(r.state.is_completed() for r in runs) == 2  # both flows went to it
    finally:
        cleanup(env)
    assert gone_within(env, 10) == []


@pytest.mark.timeout(600)
def test_a_stale_record_is_detected_and_replaced(tmp_path):
    """A recorded pid that is not the server (here: this test process, with another start time) is not
    running; `status` says so, `stop` leaves that process alone, and a command starts a new server."""
    home = tmp_path / "home"
    home.mkdir()
    me = psutil.Process()
    stale = {"pid": me.pid, "create_time": me.create_time() - 100, "port": 1, "url": "http://127.0.0.1:1/api",
             "log": str(home / "pflatents-server.log"), "started": "-", "idle": 0, "idle_since": None}
    (home / "pflatents-server.json").write_text(json.dumps(stale))
    env = _env(home)
    res = cli(["server", "status"], env=env)
    assert res.returncode == 1 and "not running" in res.stdout
    stop = cli(["server", "stop"], env=env)
    assert stop.returncode == 0 and "was not running" in stop.stdout and psutil.pid_exists(me.pid)
    assert not (home / "pflatents-server.json").exists()

    (home / "pflatents-server.json").write_text(json.dumps(stale))
    data, model = write_gmm_job(tmp_path, n=300)
    try:
        ext = cli(extract_args(tmp_path, data, model, "o.zarr"), env=env)
        assert ext.returncode == 0 and "done: 300 samples" in ext.stdout, ext.stderr
        st = record(home)
        assert st["pid"] != me.pid and st["port"] != 1 and psutil.Process(st["pid"]).is_running()
        assert cli(["server", "status"], env=env).returncode == 0
    finally:
        cleanup(env)


@pytest.mark.timeout(1200)
def test_sigkill_of_a_command_leaves_no_server_behind(tmp_path):
    """PFLATENTS_SERVER=off: the command's own server ends with it. SIGKILL extracts at seeded random
    moments (while importing, while the server starts, while shards run): after 10 s no process any of
    them started is alive."""
    data, model = write_gmm_job(tmp_path, n=20000)
    rng = random.Random(19)
    moments = sorted(rng.uniform(0.5, 14.0) for _ in range(4))
    had_server = 0
    for i, moment in enumerate(moments):
        env = _env(tmp_path / "home", mode="off", PFLATENTS_PAUSE_IN_WRITE="2")
        proc = subprocess.Popen([str(BIN / "pflatents"), *extract_args(tmp_path, data, model, f"o{i}.zarr", 8),
                                 "--shard-size", "2000"], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            time.sleep(moment)
            children = psutil.Process(proc.pid).children(recursive=True)
            had_server += any("pflatents.flows.server" in " ".join(c.cmdline()) for c in children)
            assert proc.poll() is None, f"the extract ended before {moment:.1f} s"
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            left = gone_within(env, 10)
            assert left == [], (moment, [p.cmdline() for p in left])
        finally:
            for p in marked(env):
                p.kill()
    assert had_server >= 2, f"only {had_server} of the kills ({moments}) came after the server started"


@pytest.mark.timeout(600)
def test_a_command_with_its_own_server_stops_it_at_exit(tmp_path):
    env = _env(tmp_path / "home", mode="off")
    data, model = write_gmm_job(tmp_path, n=300)
    ext = cli(extract_args(tmp_path, data, model, "o.zarr"), env=env)
    assert ext.returncode == 0 and "done: 300 samples" in ext.stdout, ext.stderr
    assert "started a local Prefect server" not in ext.stderr
    assert marked(env) == [] and not (tmp_path / "home" / "pflatents-server.json").exists()


@pytest.mark.timeout(900)
def test_ui_talks_to_its_own_server(tmp_path):
    """`server start --ui`: the dashboard's settings name this server's API (any port), status prints it."""
    home = tmp_path / "home"
    env = _env(home)
    try:
        res = cli(["server", "start", "--ui"], env=env, timeout=300)
        assert res.returncode == 0, res.stderr
        st = record(home)
        assert f"dashboard: http://127.0.0.1:{st['port']}/" in res.stdout
        with urllib.request.urlopen(f"http://127.0.0.1:{st['port']}/ui-settings", timeout=30) as r:
            assert json.loads(r.read())["api_url"] == st["url"]
        with urllib.request.urlopen(f"http://127.0.0.1:{st['port']}/", timeout=30) as r:
            assert r.status == 200 and b"<html" in r.read().lower()
        status = cli(["server", "status"], env=env)
        assert f"dashboard: http://127.0.0.1:{st['port']}/" in status.stdout
    finally:
        cleanup(env)
    assert gone_within(env, 10) == []


def test_port_taken_is_a_clear_error(tmp_path):
    import socket

    env = _env(tmp_path / "home")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        res = cli(["server", "start", "--port", str(port)], env=env)
    assert res.returncode == 2 and f"port {port}" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "home" / "pflatents-server.json").exists() and marked(env) == []


def test_bad_server_settings_are_clear_errors(tmp_path):
    data, model = write_gmm_job(tmp_path, n=50)
    for extra, words in (({"PFLATENTS_SERVER": "sometimes"}, "PFLATENTS_SERVER='sometimes'"),
                         ({"PFLATENTS_SERVER_IDLE": "-3"}, "PFLATENTS_SERVER_IDLE='-3'")):
        env = {**_env(tmp_path / "home"), **extra}
        res = cli(extract_args(tmp_path, data, model, "o.zarr"), env=env)
        assert res.returncode == 2 and words in res.stderr and "Traceback" not in res.stderr, res.stderr
        assert marked(env) == [] and not (tmp_path / "home" / "pflatents-server.json").exists()


@pytest.mark.timeout(600)
def test_an_explicit_api_url_starts_nothing(tmp_path, prefect_server):
    env = _env(tmp_path / "home", PREFECT_API_URL=prefect_server)
    data, model = write_gmm_job(tmp_path, n=300)
    ext = cli(extract_args(tmp_path, data, model, "o.zarr"), env=env)
    assert ext.returncode == 0 and "done: 300 samples" in ext.stdout, ext.stderr
    assert "started a local Prefect server" not in ext.stderr
    assert marked(env) == [] and not (tmp_path / "home" / "pflatents-server.json").exists()
    assert any(str(tmp_path / "o.zarr") in json.dumps(r.parameters) for r in flow_runs(prefect_server))
