"""Test set-up: hermetic Prefect (temp PREFECT_HOME, analytics off) and one real Prefect server.

The environment is set here, at the top, before anything imports prefect; ``PFLATENTS_SERVER=off``
keeps commands from leaving a shared local server behind. Tests that run flows
in-process or as CLI subprocesses share one real ``prefect server start`` on a free loopback port,
started lazily the first time a test asks for it and stopped (by PID) at the end of the session.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

_HOME = tempfile.mkdtemp(prefix="pflatents-prefect-")
for _var in ("PREFECT_API_URL", "PREFECT_PROFILE", "PREFECT_API_KEY"):
    os.environ.pop(_var, None)
os.environ.update({
    "PREFECT_HOME": _HOME,
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_UI_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "PREFECT_LOGGING_LEVEL": "WARNING",
    # No shared local server (it outlives a command by design): a command with no PREFECT_API_URL gets its
    # own server, which ends with it. Tests of the shared server set PFLATENTS_SERVER=shared themselves.
    "PFLATENTS_SERVER": "off",
})
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    """A free TCP port on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    """Poll url until it answers 200, the process dies, or the timeout passes."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout} s")


@pytest.fixture(scope="session")
def prefect_server():
    """A real `prefect server start` on a free loopback port; yields its API URL."""
    port = free_port()
    log = open(Path(_HOME) / "server.log", "w")
    proc = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy(), start_new_session=True)
    url = f"http://127.0.0.1:{port}/api"
    try:
        wait_http(url + "/health", 180, proc)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture
def prefect_api(prefect_server):
    """Point this process's Prefect client at the session server for one test."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: prefect_server}):
        yield prefect_server


@pytest.fixture
def cli_env(prefect_server):
    """Environment for `pflatents` subprocesses: the session's Prefect server, quiet logs."""
    env = os.environ.copy()
    env["PREFECT_API_URL"] = prefect_server
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _torch_state(torch) -> tuple:
    return (torch.get_num_threads(), torch.get_default_dtype(), torch.are_deterministic_algorithms_enabled(),
            torch.get_float32_matmul_precision(), torch.is_grad_enabled())


def _set_torch_state(torch, state: tuple) -> None:
    threads, dtype, deterministic, matmul, grad = state
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    torch.set_default_dtype(dtype)
    torch.use_deterministic_algorithms(deterministic)
    torch.set_float32_matmul_precision(matmul)
    torch.set_grad_enabled(grad)


def _uses_problems(module) -> bool:
    """Whether a test module is built on tests/problems.py or tests/tiny_diffusers.py (imports any of
    their functions or classes, or the module itself)."""
    tiny = ("problems", "tiny_diffusers")
    return any(getattr(v, "__module__", None) in tiny or getattr(v, "__name__", None) in tiny
               for v in vars(module).values())


@pytest.fixture(autouse=True)
def _torch_process_state(request):
    """Process-global torch settings (threads, default dtype, deterministic algorithms, float32 matmul
    precision, grad mode) are put back after every test, so no test's result depends on which tests ran
    before it in the same process. Modules on the tiny analytic problems of tests/problems.py run on one
    torch thread: with two, each small op pays thread wake-ups on a busy 2-core box."""
    import torch

    saved = _torch_state(torch)
    if request.module is not None and _uses_problems(request.module):
        torch.set_num_threads(1)
    try:
        yield
    finally:
        _set_torch_state(torch, saved)


# Fixtures that start or use a real Prefect server: the tests that take them are integration tests
# (`make test-fast` leaves them out; `make test` and CI run them).
SERVER_FIXTURES = {"prefect_server", "prefect_api", "cli_env"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SERVER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)
