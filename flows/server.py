"""Prefect's process environment for every pflatents command, and the managed local Prefect server.

``prefect_env()`` sets quiet, offline-safe defaults before prefect is imported (a user's own
settings win: only unset variables are filled) and, when ``PREFECT_API_URL`` is unset and the
managed server is up, points this process at it. Without a server Prefect starts a temporary one
inside every command, which costs seconds to tens of seconds each time.

The managed server (``pflatents server start|stop|status``) is a ``prefect server start`` on a free
loopback port, started in its own session so it outlives the shell. Its state lives under
``PREFECT_HOME`` (default ``~/.prefect``): ``pflatents-server.json`` (pid, process start time,
port, URL, log path) and ``pflatents-server.log``. A server counts as running only while that pid
is alive with the recorded start time (a reused pid is not it) and ``/api/health`` answers.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["prefect_env", "prefect_home", "server_status", "start_server", "stop_server", "temporary_server_note",
           "note_before_flow", "note_printers"]

STATE, LOG = "pflatents-server.json", "pflatents-server.log"


def prefect_env() -> None:
    """Quiet, offline-safe Prefect defaults, and the managed server if one runs (call before prefect is imported)."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    # OpenMP's spin-waiting threads made 2-thread torch 20-50x slower whenever another process
    # competed for the cores (measured, benchmarks/solvers.py); passive waiting costs nothing alone.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if not os.environ.get("PREFECT_API_URL") and (prefect_home() / STATE).is_file():
        st = server_status()
        if st["running"]:
            os.environ["PREFECT_API_URL"] = st["url"]


# Where the CLI prints notes (stderr); empty for library use, which prints nothing.
note_printers: list = []
_noted: list = []


def temporary_server_note() -> str | None:
    """The line to print before a flow runs on Prefect's temporary server (None when a server is configured)."""
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        return None
    return ("pflatents: no Prefect server configured, so Prefect starts a temporary one for this command (10-35 s "
            "measured, benchmarks/README.md); `pflatents server start` keeps one running for every command")


def note_before_flow() -> None:
    """Called right before a flow runs: through the CLI's printer, say once how to save the start-up."""
    if note_printers and not _noted:
        _noted.append(True)
        msg = temporary_server_note()
        if msg:
            note_printers[0](msg)


def prefect_home() -> Path:
    return Path(os.environ.get("PREFECT_HOME") or "~/.prefect").expanduser()


def _read_state() -> dict[str, Any] | None:
    try:
        return json.loads((prefect_home() / STATE).read_text())
    except (OSError, ValueError):
        return None


def _write_state(st: dict[str, Any]) -> None:
    path = prefect_home() / STATE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(st, indent=2))
    os.replace(tmp, path)


def _process_alive(st: dict[str, Any]) -> bool:
    """The recorded process still runs (same pid and start time; a zombie does not count)."""
    import psutil

    try:
        p = psutil.Process(int(st["pid"]))
        return abs(p.create_time() - float(st["create_time"])) < 1e-3 and p.status() != psutil.STATUS_ZOMBIE
    except (psutil.Error, KeyError, ValueError, TypeError):
        return False


def _healthy(url: str, timeout: float = 2.0) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(url.rstrip("/") + "/health", timeout=timeout) as r:
            return r.status == 200
    except OSError:
        return False


def server_status() -> dict[str, Any]:
    """``{"running", "pid", "port", "url", "log", "started", "state"}`` of the managed server."""
    st = _read_state()
    if st is None:
        return {"running": False, "state": str(prefect_home() / STATE), "log": str(prefect_home() / LOG)}
    running = _process_alive(st) and _healthy(st["url"])
    return {**st, "running": running, "state": str(prefect_home() / STATE)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _prefect_command() -> list[str]:
    exe = Path(sys.executable).parent / "prefect"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "prefect"]


def start_server(port: int | None = None, timeout: float = 180.0, ui: bool = False) -> dict[str, Any]:
    """Start the managed server (or report the one running); returns its status with ``started_now``.

    Raises InputError when the port is taken or the server does not answer within ``timeout``
    (it is stopped then, and the log named)."""
    from pflatents.tasks.errors import InputError

    st = server_status()
    if st["running"]:
        return {**st, "started_now": False}
    if st.get("pid") and _process_alive(st):  # recorded, alive, not answering: a start still in progress
        _terminate(st)
    home = prefect_home()
    home.mkdir(parents=True, exist_ok=True)
    port = port or _free_port()
    with socket.socket() as s:
        if s.connect_ex(("127.0.0.1", port)) == 0:
            raise InputError(f"port {port} on 127.0.0.1 is taken; choose another with --port, or leave --port out")
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1", PREFECT_HOME=str(home),
               PREFECT_SERVER_UI_ENABLED="true" if ui else "false")
    log_path = home / LOG
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([*_prefect_command(), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=home,
                                start_new_session=True)
    import psutil

    url = f"http://127.0.0.1:{port}/api"
    st = {"pid": proc.pid, "create_time": psutil.Process(proc.pid).create_time(), "port": port, "url": url,
          "log": str(log_path), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "prefect_home": str(home)}
    _write_state(st)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            (home / STATE).unlink(missing_ok=True)
            raise InputError(f"the Prefect server exited with code {proc.returncode} while starting; see {log_path}")
        if _healthy(url, timeout=1.0):
            return {**server_status(), "started_now": True}
        time.sleep(0.25)
    _terminate(st)
    (home / STATE).unlink(missing_ok=True)
    raise InputError(f"the Prefect server did not answer at {url} within {timeout:g} s and was stopped; see {log_path}")


def _terminate(st: dict[str, Any], timeout: float = 30.0) -> None:
    """SIGTERM the server's process group (it leads its own session), then SIGKILL after ``timeout``."""
    import psutil

    pid = int(st["pid"])
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if not _process_alive(st):
            return
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        try:
            psutil.Process(pid).wait(timeout)
        except psutil.TimeoutExpired:
            continue
        except psutil.Error:
            return


def stop_server(timeout: float = 30.0) -> dict[str, Any] | None:
    """Stop the managed server; returns what was recorded about it (None when none was recorded)."""
    st = _read_state()
    if st is None:
        return None
    was_running = _process_alive(st)
    if was_running:
        _terminate(st, timeout)
    (prefect_home() / STATE).unlink(missing_ok=True)
    return {**st, "was_running": was_running}
