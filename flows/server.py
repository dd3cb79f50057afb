"""Prefect's process environment for every pflatents command, and the local Prefect server it uses.

``prefect_env()`` sets quiet, offline-safe defaults before prefect is imported (a user's own settings
win: only unset variables are filled). ``use_server()``, called right before a flow runs, makes sure
a Prefect API answers:

- ``PREFECT_API_URL`` set (environment, Prefect profile or settings context): that server; nothing
  is started.
- Otherwise, by default (``PFLATENTS_SERVER=shared``), the **shared local server**: one server per
  ``PREFECT_HOME``, started by the first command that needs one and kept for the next; it stops
  itself once no command has used it for ``PFLATENTS_SERVER_IDLE`` seconds (default 1800; 0: never).
  A command holds a lease (a file named by its pid) while it runs, so a long job never loses its
  server; a lease whose process is gone (SIGKILL) is dropped by the server.
- ``PFLATENTS_SERVER=off``: a server for this command only, which ends with the command however
  the command ends (SIGKILL included: it watches its parent, ``PR_SET_PDEATHSIG`` on Linux and a
  poll of the parent pid everywhere).

Prefect's own temporary server is never used: its subprocess outlived a killed command.

The server process is ``python -m pflatents.flows.server``: uvicorn serving Prefect's API app
in-process, on a socket bound before Prefect is imported (the port is the kernel's choice, no
race). State under ``PREFECT_HOME`` (default ``~/.prefect``): ``pflatents-server.json`` (the record:
pid, process start time, port, URL, database, log, idle setting, idle since, dashboard),
``pflatents-server.lock`` (an flock: one start at a time, and the server takes it before it stops
for idleness), ``pflatents-server.leases/`` (one file per command using it),
``pflatents-server.log``, and Prefect's database ``prefect.db``. A server counts as running only
while the recorded pid is alive with the recorded start time (a reused pid is not it) and
``/api/health`` answers; a record that fails this is stale and replaced by the next start.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

__all__ = ["prefect_env", "prefect_home", "use_server", "prestart", "server_status", "start_server", "stop_server",
           "configured_api_url", "server_mode", "idle_setting", "note_printers", "FLOW_COMMANDS", "pause_gc",
           "resume_gc"]

STATE, LOG, LOCK, LEASES = "pflatents-server.json", "pflatents-server.log", "pflatents-server.lock", "pflatents-server.leases"
PRIVATE_LOG = "pflatents-command-servers.log"
DEFAULT_IDLE_S = 1800.0
# Commands that run flows: with PFLATENTS_SERVER=off their server starts while they import (``prestart``).
FLOW_COMMANDS = ("extract", "resume", "analyze", "train", "demo")


def prefect_env() -> None:
    """Quiet, offline-safe Prefect defaults (call before prefect is imported)."""
    from pflatents.flows.dashboard import logging_env

    logging_env()  # before PREFECT_LOGGING_LEVEL below: a user's own level keeps Prefect's console as it was
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    # OpenMP's spin-waiting threads made 2-thread torch 20-50x slower whenever another process
    # competed for the cores (measured, benchmarks/cases/solvers.py); passive waiting costs nothing alone.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


# The collector paused by ``pause_gc`` (so that ``resume_gc`` undoes only its own pause).
_gc_paused: list[bool] = [False]


def pause_gc() -> None:
    """Pause Python's cyclic garbage collector while a command starts (``resume_gc`` ends the pause).

    Importing torch, zarr and Prefect leaves several hundred thousand long-lived objects; the collector's full
    passes over them took ~20 % of a trivial extract's CPU time (benchmarks/README.md, "The Prefect
    server's lifecycle") and found almost nothing to free. Reference counting still frees
    everything that is not in a cycle while paused."""
    import gc

    if gc.isenabled() and not _gc_paused[0]:
        gc.disable()
        _gc_paused[0] = True


def resume_gc() -> None:
    """End ``pause_gc``'s pause (no-op otherwise): move every object alive now (the imported modules,
    mostly) to the collector's permanent generation (``gc.freeze``), so that later full passes
    do not walk them again, and collect as usual from here on (a flow's work runs under it)."""
    import gc

    if _gc_paused[0]:
        _gc_paused[0] = False
        gc.freeze()
        gc.enable()


# Where the CLI prints notes (stderr); empty for library use, which prints nothing.
note_printers: list = []


def _note(msg: str) -> None:
    if note_printers:
        note_printers[0](msg)


def _input_error(msg: str) -> Exception:
    from pflatents.tasks.errors import InputError

    return InputError(msg)


def prefect_home() -> Path:
    return Path(os.environ.get("PREFECT_HOME") or "~/.prefect").expanduser()


def server_mode() -> str:
    """``shared`` (default) or ``off``, from ``PFLATENTS_SERVER``."""
    mode = (os.environ.get("PFLATENTS_SERVER") or "shared").strip().lower()
    if mode not in ("shared", "off"):
        raise _input_error(f"PFLATENTS_SERVER={os.environ['PFLATENTS_SERVER']!r} is not a server mode; use shared "
                           f"(the default: one local Prefect server kept between commands) or off (a server for "
                           f"each command, stopped with it)")
    return mode


def idle_setting() -> float:
    """Seconds the shared server stays up unused (``PFLATENTS_SERVER_IDLE``, default 1800; 0: never stops)."""
    raw = os.environ.get("PFLATENTS_SERVER_IDLE")
    if not raw:
        return DEFAULT_IDLE_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise _input_error(f"PFLATENTS_SERVER_IDLE={raw!r} must be a number of seconds >= 0 (0: the shared server "
                           f"never stops by itself)")
    return value


def configured_api_url() -> str | None:
    """The Prefect API this process is told to use: the environment, else Prefect's settings (a profile,
    a settings context) once prefect is imported; None when nothing is configured."""
    if os.environ.get("PREFECT_API_URL"):
        return os.environ["PREFECT_API_URL"]
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value() or None


# This process's server: {"url": ..., "proc": Popen (off mode only)}.
_mine: dict[str, Any] = {}
_mine_lock = threading.Lock()


def use_server() -> str:
    """Make sure a Prefect API answers for the flow about to run; returns its URL (see the module doc)."""
    with _mine_lock:
        if _mine.get("url") and os.environ.get("PREFECT_API_URL") == _mine["url"]:
            return _mine["url"]
        fresh = "prefect" not in sys.modules  # Prefect reads its settings now, with the environment as it is
        url = configured_api_url()
        if url:
            return url
        if server_mode() == "shared":
            st = _acquire_shared()
            if st.get("started_now"):
                idle = st.get("idle") or 0
                _note(f"pflatents: started a local Prefect server for this and later commands at {st['url']} "
                      + (f"(it stops after {_duration(idle)} unused; " if idle else "(")
                      + "`pflatents server status` shows it, `pflatents server stop` stops it)")
            url = st["url"]
        else:
            url = _private_server()
        _mine["url"] = url
        os.environ["PREFECT_API_URL"] = url
        _settings_for_our_server(url, reread=not fresh)
        return url


def _settings_for_our_server(url: str, reread: bool = True) -> None:
    """Prefect read its settings at import: give them the API URL just set (``reread``: read them all
    again, for a process that imported Prefect earlier and may have changed its environment since),
    and send no flow-run heartbeats to our server. Heartbeats only feed zombie-run automations, which
    our server has none of, and a flow waits up to 1 s for the heartbeat thread when it ends
    (benchmarks/README.md). Each reading of Prefect's settings costs ~0.05 s. Unless the environment
    turns CSRF protection on (our server is started with the same environment), the client asks our
    server for no CSRF token (one request per client, ~0.05 s, answered "not enabled")."""
    import prefect.context
    from prefect.settings import (PREFECT_API_URL, PREFECT_CLIENT_CSRF_SUPPORT_ENABLED,
                                  PREFECT_FLOWS_HEARTBEAT_FREQUENCY)

    if reread:
        prefect.context.refresh_global_settings_context()
    ctx = prefect.context.GLOBAL_SETTINGS_CONTEXT
    updates = {PREFECT_API_URL: url, PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}
    if not ctx.settings.server.api.csrf_protection_enabled:
        updates[PREFECT_CLIENT_CSRF_SUPPORT_ENABLED] = False
    ctx.settings = ctx.settings.copy_with_update(updates=updates)


def _duration(seconds: float) -> str:
    if seconds >= 120:
        return f"{seconds / 60:g} min"
    return f"{seconds:g} s"


# ---------------------------------------------------------------------------------------------------
# state: record, lock, leases


def _read_state(home: Path | None = None) -> dict[str, Any] | None:
    try:
        st = json.loads(((home or prefect_home()) / STATE).read_text())
        return st if isinstance(st, dict) else None
    except (OSError, ValueError):
        return None


def _write_state(st: dict[str, Any], home: Path | None = None) -> None:
    path = (home or prefect_home()) / STATE
    tmp = path.with_name(f".{STATE}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(st, indent=2))
    os.replace(tmp, path)


def _remove_state(home: Path, pid: int | None = None) -> None:
    """Remove the record (only if it still names ``pid``, when given)."""
    st = _read_state(home)
    if st is not None and (pid is None or st.get("pid") == pid):
        (home / STATE).unlink(missing_ok=True)


@contextlib.contextmanager
def _locked(home: Path, timeout: float | None = None) -> Iterator[None]:
    """Hold ``pflatents-server.lock`` (an flock, released by the kernel if this process dies)."""
    import fcntl

    home.mkdir(parents=True, exist_ok=True)
    fd = os.open(home / LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(str(home / LOCK)) from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)  # releases the flock


def _same_process(pid: Any, create_time: Any) -> bool:
    """That pid runs, started at that time (a reused pid does not count), and is not a zombie."""
    import psutil

    try:
        p = psutil.Process(int(pid))
        return abs(p.create_time() - float(create_time)) < 1e-3 and p.status() != psutil.STATUS_ZOMBIE
    except (psutil.Error, ValueError, TypeError):
        return False


def _process_alive(st: dict[str, Any]) -> bool:
    return _same_process(st.get("pid"), st.get("create_time"))


def _live_leases(home: Path, reap: bool = False) -> list[int]:
    """Pids of the commands holding a lease on the shared server; ``reap`` deletes the leases of dead ones."""
    live = []
    for path in (home / LEASES).glob("*"):
        try:
            rec = json.loads(path.read_text())
            alive = _same_process(rec["pid"], rec["create_time"])
        except (OSError, ValueError, KeyError, TypeError):
            alive = False
        if alive:
            live.append(int(rec["pid"]))
        elif reap:
            path.unlink(missing_ok=True)
    return live


def _take_lease(home: Path) -> None:
    import psutil

    (home / LEASES).mkdir(exist_ok=True)
    path = home / LEASES / str(os.getpid())
    path.write_text(json.dumps({"pid": os.getpid(), "create_time": psutil.Process().create_time()}))
    atexit.register(path.unlink, missing_ok=True)


def _healthy(url: str, timeout: float = 2.0) -> bool:
    from pflatents.flows.dashboard import healthy

    return healthy(url, timeout)


def server_status() -> dict[str, Any]:
    """The shared server: ``running``, ``pid``, ``port``, ``url``, ``database``, ``log``, ``started``,
    ``dashboard`` (URL or None), ``idle`` (seconds, 0: never stops), ``in_use_by`` (commands holding a
    lease), ``idle_left_s`` (None while in use or when it never stops), ``state`` (the record's path)."""
    home = prefect_home()
    st = _read_state(home)
    if st is None:
        return {"running": False, "state": str(home / STATE), "log": str(home / LOG)}
    running = _process_alive(st) and _healthy(st["url"])
    users = _live_leases(home) if running else []
    idle = float(st.get("idle") or 0)
    idle_left = None
    if running and idle and not users:
        since = st.get("idle_since") or time.time()
        idle_left = max(0.0, idle - (time.time() - float(since)))
    return {**st, "running": running, "state": str(home / STATE), "in_use_by": len(users), "idle_left_s": idle_left}


# ---------------------------------------------------------------------------------------------------
# starting and stopping


def _launch(home: Path, *, port: int, idle: float, ui: bool, parent: int | None, log_path: Path) -> subprocess.Popen:
    """Start ``python -m pflatents.flows.server`` (returns at once; ``_await_ready`` waits for it).

    ``parent``: a command's own server, which watches this process (PR_SET_PDEATHSIG only when
    launched from the main thread: the kernel sends it when the launching *thread* ends)."""
    cmd = [sys.executable, "-m", "pflatents.flows.server", "--home", str(home), "--port", str(port), "--idle", str(idle)]
    if ui:
        cmd.append("--ui")
    if parent:
        cmd += ["--parent", str(parent)]
        if threading.current_thread() is threading.main_thread():
            cmd.append("--pdeathsig")
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1")
    home.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log, env=env, cwd=home,
                                start_new_session=parent is None)


def _await_ready(proc: subprocess.Popen, *, port: int, timeout: float, log_path: Path, own_group: bool) -> int:
    """The server's port once ``/api/health`` answers. Raises InputError (after killing it) when the port
    is taken, it exits, or it does not answer within ``timeout``."""
    import select

    deadline = time.monotonic() + timeout
    try:
        assert proc.stdout is not None
        line = b""
        while not line.endswith(b"\n") and time.monotonic() < deadline:
            ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            chunk = os.read(proc.stdout.fileno(), 256)
            if not chunk:
                break
            line += chunk
        proc.stdout.close()
        word, _, value = line.decode(errors="replace").strip().partition(" ")
        if word == "TAKEN":
            raise _input_error(f"port {port} on 127.0.0.1 is taken; choose another with --port, or leave --port out")
        if word != "PORT":
            raise _input_error(f"the Prefect server did not start (exit code {proc.poll()}); see {log_path}")
        port = int(value)
        url = f"http://127.0.0.1:{port}/api"
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise _input_error(f"the Prefect server exited with code {proc.returncode} while starting; see {log_path}")
            if _healthy(url, timeout=min(2.0, max(0.1, deadline - time.monotonic()))):
                return port
            time.sleep(0.05)
        raise _input_error(f"the Prefect server did not answer at {url} within {timeout:g} s and was stopped; "
                           f"see {log_path}")
    except BaseException:
        _kill_tree(proc.pid, own_group=own_group)
        with contextlib.suppress(Exception):
            proc.wait(10)
        raise


def _kill_tree(pid: int, own_group: bool, sig: int = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if own_group:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)


def _start_shared(home: Path, *, port: int | None, idle: float, ui: bool, timeout: float) -> dict[str, Any]:
    """Under the lock, with no running server recorded: start one and record it."""
    import psutil

    log_path = home / LOG
    proc = _launch(home, port=port or 0, idle=idle, ui=ui, parent=None, log_path=log_path)
    port = _await_ready(proc, port=port or 0, timeout=timeout, log_path=log_path, own_group=True)
    url = f"http://127.0.0.1:{port}/api"
    st = {"pid": proc.pid, "create_time": psutil.Process(proc.pid).create_time(), "port": port, "url": url,
          "database": str(home / "prefect.db"), "log": str(log_path), "prefect_home": str(home),
          "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "idle": idle, "idle_since": time.time(),
          "dashboard": f"http://127.0.0.1:{port}/" if ui else None}
    _write_state(st, home)
    return st


def _clear_stale(home: Path, st: dict[str, Any], patience: float = 30.0) -> bool:
    """A record whose server did not answer at once. A live process gets ``patience`` seconds to answer
    (a loaded machine); returns True when it does. Otherwise stop what is left of it (a hung server)
    and drop the record."""
    if st.get("pid") and _process_alive(st):
        deadline = time.monotonic() + patience
        while time.monotonic() < deadline and _process_alive(st):
            if _healthy(st["url"], timeout=5.0):
                return True
            time.sleep(0.5)
        _terminate(st)
    _remove_state(home)
    return False


def _acquire_shared() -> dict[str, Any]:
    """The running shared server, started now if there is none; this process takes a lease on it."""
    home = prefect_home()
    idle = idle_setting()
    timeout = float(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS") or 180)
    try:
        with _locked(home, timeout=timeout + 60):
            st = server_status()
            started = False
            if not st["running"] and not (_read_state(home) is not None and _clear_stale(home, st)):
                st = _start_shared(home, port=None, idle=idle, ui=False, timeout=timeout)
                started = True
            _take_lease(home)
            rec = _read_state(home) or st
            if rec.get("idle_since") is not None:  # in use from now: the idle clock restarts when this ends
                _write_state({**rec, "idle_since": None}, home)
            return {**st, "started_now": started}
    except TimeoutError:
        raise _input_error(f"another pflatents command held {home / LOCK} for more than {timeout + 60:g} s while "
                           f"starting the local Prefect server; see {home / LOG}, or set PFLATENTS_SERVER=off") from None


def prestart() -> None:
    """Before a command that runs flows does anything: refuse bad server settings (InputError) and, with
    ``PFLATENTS_SERVER=off`` and no API in the environment, launch the command's own server now, so that
    it starts while the command imports torch and Prefect (``use_server`` waits for it)."""
    mode = server_mode()
    if mode == "shared":
        idle_setting()
    if os.environ.get("PREFECT_API_URL") or mode != "off":
        return
    if "prefect.settings" in sys.modules and configured_api_url():  # a settings context or profile names one
        return
    with _mine_lock:
        if "proc" not in _mine:
            _launch_private()


def _launch_private() -> None:
    home = prefect_home()
    log_path = home / PRIVATE_LOG
    proc = _launch(home, port=0, idle=0, ui=False, parent=os.getpid(), log_path=log_path)
    atexit.register(_stop_private, proc)
    _mine["proc"] = proc
    _mine["log"] = log_path


def _private_server() -> str:
    """This command's own server (PFLATENTS_SERVER=off), launched now unless ``prestart`` did."""
    if "proc" not in _mine:
        _launch_private()
    if "private_url" not in _mine:
        timeout = float(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS") or 180)
        port = _await_ready(_mine["proc"], port=0, timeout=timeout, log_path=_mine["log"], own_group=False)
        _mine["private_url"] = f"http://127.0.0.1:{port}/api"
    return _mine["private_url"]


def _stop_private(proc: subprocess.Popen) -> None:
    """At exit: SIGTERM this command's server, SIGKILL it after 5 s."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def start_server(port: int | None = None, timeout: float = 180.0, ui: bool = False,
                 idle: float = 0.0) -> dict[str, Any]:
    """Start the shared server (``pflatents server start``), or report the one running; returns its status
    with ``started_now``. ``idle``: seconds unused before it stops (0: never); set on a running one too.

    Raises InputError when the port is taken, a running server lacks the asked-for dashboard, or the
    server does not answer within ``timeout`` (it is stopped then, and the log named)."""
    home = prefect_home()
    with _locked(home, timeout=timeout + 60):
        st = server_status()
        if not st["running"] and _read_state(home) is not None and _clear_stale(home, st):
            st = {**st, "running": True}  # slow to answer, but it answered
        if st["running"]:
            if port and port != st["port"]:
                raise _input_error(f"the local Prefect server already runs on port {st['port']} ({st['url']}); "
                                   f"`pflatents server stop` first to move it to port {port}")
            if ui and not st.get("dashboard"):
                raise _input_error(f"the local Prefect server at {st['url']} runs without the dashboard; stop it "
                                   f"(`pflatents server stop`) and start it again with --ui")
            rec = _read_state(home) or {}
            if rec.get("idle") != idle:
                _write_state({**rec, "idle": idle, "idle_since": time.time()}, home)
            return {**server_status(), "started_now": False}
        if port:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    raise _input_error(f"port {port} on 127.0.0.1 is taken; choose another with --port, or leave "
                                       f"--port out")
        _start_shared(home, port=port, idle=idle, ui=ui, timeout=timeout)
        return {**server_status(), "started_now": True}


def _terminate(st: dict[str, Any], timeout: float = 30.0) -> None:
    """SIGTERM the server's process group (it leads its own session), then SIGKILL after ``timeout``."""
    import psutil

    pid = int(st["pid"])
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if not _process_alive(st):
            return
        _kill_tree(pid, own_group=True, sig=sig)
        try:
            psutil.Process(pid).wait(timeout)
        except psutil.TimeoutExpired:
            continue
        except psutil.Error:
            return


def stop_server(timeout: float = 30.0) -> dict[str, Any] | None:
    """Stop the shared server; returns what was recorded about it (None when none was recorded)."""
    home = prefect_home()
    with _locked(home, timeout=timeout + 60):
        st = _read_state(home)
        if st is None:
            return None
        was_running = _process_alive(st)
        if was_running:
            _terminate(st, timeout)
        _remove_state(home)
    return {**st, "was_running": was_running}


# ---------------------------------------------------------------------------------------------------
# the server process: python -m pflatents.flows.server --home H --port P --idle S [--ui] [--parent PID]


def _set_pdeathsig() -> None:
    """Have the kernel send SIGTERM to this process when its parent (thread) ends (Linux only)."""
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(Exception):
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG = 1


def _watch_parent(parent: int, server: Any) -> None:
    """End this server when ``parent`` ends (a poll of the parent pid; PR_SET_PDEATHSIG is set earlier)."""

    def poll() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        server.should_exit = True
        time.sleep(10)
        os._exit(1)  # a shutdown that hangs

    threading.Thread(target=poll, name="pflatents-parent-watch", daemon=True).start()


def _watch_idle(home: Path, server: Any) -> None:
    """Stop once no lease has been held for the record's ``idle`` seconds; keep ``idle_since`` current."""
    me = os.getpid()

    def loop() -> None:
        while not server.should_exit:
            st = _read_state(home) or {}
            idle = float(st.get("idle") or 0)
            time.sleep(max(0.2, min(5.0, idle / 10)) if idle else 5.0)
            try:
                with _locked(home, timeout=1.0):
                    st = _read_state(home)
                    if st is None or st.get("pid") != me:  # stopped or replaced: this server is no one's
                        server.should_exit = True
                        return
                    users = _live_leases(home, reap=True)
                    now = time.time()
                    if users:
                        if st.get("idle_since") is not None:
                            _write_state({**st, "idle_since": None}, home)
                    elif st.get("idle_since") is None:
                        _write_state({**st, "idle_since": now}, home)
                    elif st.get("idle") and now - float(st["idle_since"]) >= float(st["idle"]):
                        _remove_state(home, me)
                        server.should_exit = True
                        return
            except TimeoutError:
                continue

    threading.Thread(target=loop, name="pflatents-idle-watch", daemon=True).start()


def _serve(argv: list[str]) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m pflatents.flows.server")
    ap.add_argument("--home", required=True)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--idle", type=float, default=0.0)
    ap.add_argument("--ui", action="store_true")
    ap.add_argument("--parent", type=int, default=None, help="stop when this process ends (a command's own server)")
    ap.add_argument("--pdeathsig", action="store_true", help="also ask the kernel for SIGTERM when the parent ends")
    a = ap.parse_args(argv)
    if a.pdeathsig:
        _set_pdeathsig()
    if a.parent and os.getppid() != a.parent:
        return 1  # the command is already gone
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(("127.0.0.1", a.port))
    except OSError:
        print("TAKEN", flush=True)
        return 3
    sock.listen(128)
    port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/api"
    os.environ.pop("PREFECT_API_URL", None)
    os.environ.update(PREFECT_HOME=a.home, PREFECT_SERVER_UI_ENABLED="true" if a.ui else "false",
                      PREFECT_SERVER_UI_API_URL=url, PREFECT_SERVER_API_HOST="127.0.0.1",
                      PREFECT_SERVER_API_PORT=str(port))
    print(f"PORT {port}", flush=True)
    os.dup2(2, 1)  # from here on stdout goes to the log too

    import uvicorn

    from prefect.server.api.server import create_app

    app = create_app(final=True, ephemeral=bool(a.parent))
    server = uvicorn.Server(uvicorn.Config(app, log_level="error", lifespan="on", timeout_keep_alive=5))
    if a.parent:
        _watch_parent(a.parent, server)
    else:
        _watch_idle(Path(a.home), server)
    server.run(sockets=[sock])
    return 0


if __name__ == "__main__":
    sys.exit(_serve(sys.argv[1:]))
