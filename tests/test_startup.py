"""A command's fixed cost: the collector paused while it starts, and flow parameters sent without FastAPI.

``pause_gc``/``resume_gc`` (flows/server.py) and ``JsonFlow`` (flows/fastflow.py); the figures they
bought are in benchmarks/README.md ("The Prefect server's lifecycle"). Tests that take
``prefect_api`` are marked integration by conftest."""

from __future__ import annotations

import enum
import gc
import os
import subprocess
import sys

import numpy as np
import pytest

from extract_helpers import write_gmm_job
from pflatents.flows import server


@pytest.fixture
def gc_restored():
    """Leave the collector as the test found it (enabled, nothing of the test's left frozen)."""
    was = gc.isenabled()
    server._gc_paused[0] = False
    yield
    server._gc_paused[0] = False
    gc.unfreeze()
    (gc.enable if was else gc.disable)()


def test_pause_and_resume_gc(gc_restored):
    gc.enable()
    gc.unfreeze()
    server.pause_gc()
    assert not gc.isenabled()
    server.pause_gc()  # twice: still one pause
    junk = [[] for _ in range(1000)]
    server.resume_gc()
    assert gc.isenabled() and gc.get_freeze_count() >= len(junk)  # what lived at the end of the pause is frozen
    frozen = gc.get_freeze_count()
    more = [[] for _ in range(1000)]
    server.resume_gc()  # no pause: nothing happens (nothing new frozen; frozen objects freed by
    # reference counting meanwhile, e.g. in another test's leftover thread, lower the count)
    assert gc.isenabled() and gc.get_freeze_count() < frozen + len(more)


def test_resume_leaves_a_collector_someone_else_disabled(gc_restored):
    gc.unfreeze()
    gc.disable()
    server.pause_gc()  # not ours to pause
    server.resume_gc()
    assert not gc.isenabled() and gc.get_freeze_count() == 0


def test_cli_pauses_only_while_a_flow_command_starts(gc_restored, monkeypatch, tmp_path):
    """A command that runs no flow gets the collector back as soon as its arguments are parsed; a flow
    command runs its start-up without it; either way it is back when main() returns."""
    from pflatents.flows import cli, dashboard
    from pflatents.flows.cli import extract as extract_cmd

    monkeypatch.setattr(os, "environ", os.environ.copy())  # main() fills in Prefect's settings: undone after
    monkeypatch.setattr(server, "note_printers", [])
    monkeypatch.setattr(dashboard, "quiet", [True])
    seen = {}

    def recorder(name):
        def handler(args):
            seen[name] = gc.isenabled()
            return 0
        return handler

    monkeypatch.setattr(extract_cmd, "cmd_status", recorder("status"))
    monkeypatch.setattr(extract_cmd, "cmd_extract", recorder("extract"))
    gc.enable()
    assert cli.main(["status", str(tmp_path / "none.zarr")]) == 0
    assert gc.isenabled()
    assert cli.main(["extract", "--data", "x.npy", "--model", "gmm:m.json", "--out", str(tmp_path / "o.zarr")]) == 0
    assert seen == {"status": True, "extract": False}
    assert gc.isenabled()


def test_an_extract_flow_runs_with_the_collector_on(gc_restored, tmp_path, prefect_api, monkeypatch):
    """The start-up pause ends before the flow: the shards are integrated with the collector running."""
    import pflatents
    from pflatents.tasks.wrappers import extract as wrappers

    data, model = write_gmm_job(tmp_path, n=300)
    during = []
    real = wrappers.run_shards

    def watched(*args, **kwargs):
        during.append(gc.isenabled())
        return real(*args, **kwargs)

    monkeypatch.setattr(wrappers, "run_shards", watched)
    gc.enable()
    server.pause_gc()
    out = pflatents.extract(str(data), f"gmm:{model}", str(tmp_path / "s.zarr"), solver="rk4", steps=4,
                            shard_size=100, batch_size=100)
    assert out["samples"] == 300 and during and all(during)
    assert gc.isenabled() and gc.get_freeze_count() > 0


class Colour(enum.Enum):
    RED = 1


@pytest.mark.parametrize("value, plain", [
    (None, True), (True, True), (3, True), (2.5, True), ("s", True), ([1, 2, 3], True), ((1, "a"), True),
    ({"a": [1, {"b": None}]}, True), ({1: "a"}, False), (Colour.RED, False), (np.int64(3), False),
    ([1, np.float32(2)], False), (b"x", False),
])
def test_plain_json(value, plain):
    from pflatents.flows.fastflow import plain_json

    assert plain_json(value) is plain


def test_json_flow_sends_what_prefects_encoder_sends():
    """For plain parameters the result equals FastAPI's encoder's (tuples as lists); anything else goes
    through Prefect's own serializer. with_options keeps the class."""
    from fastapi.encoders import jsonable_encoder
    from prefect.flows import Flow

    from pflatents.flows.fastflow import JsonFlow, json_flow

    @json_flow(name="t", persist_result=False)
    def f(a: str, ids: list[int], opts: dict | None = None):
        return a

    params = {"a": "s.zarr", "ids": (0, 3, 7), "opts": {"k": [1.5, None, True]}}
    assert f.serialize_parameters(params) == {k: jsonable_encoder(v) for k, v in params.items()}
    odd = {"a": Colour.RED, "ids": [np.int64(1)], "opts": None}
    assert f.serialize_parameters(odd) == Flow.serialize_parameters(f, odd)
    assert f.serialize_parameters(odd)["a"] == 1  # Prefect's way: the enum's value
    assert isinstance(f.with_options(flow_run_name="x"), JsonFlow)


def test_an_extract_imports_no_fastapi(tmp_path, prefect_api):
    """A whole extract (a fresh interpreter, a real server) never imports FastAPI."""
    data, model = write_gmm_job(tmp_path, n=200)
    code = ("import sys, pflatents; "
            f"pflatents.extract({str(data)!r}, 'gmm:{model}', {str(tmp_path / 's.zarr')!r}, solver='rk4', steps=4); "
            "print('fastapi' in sys.modules)")
    env = {**os.environ, "PREFECT_API_URL": prefect_api}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip().splitlines()[-1] == "False"


def test_an_extract_asks_the_server_for_no_result_storage(tmp_path, prefect_api):
    """Flows that persist no results give Prefect its local result path up front (JsonFlow), so neither
    the flow run nor its task runs ask the server for a default result storage (a request each)."""
    data, model = write_gmm_job(tmp_path, n=200)
    code = ("import sys, httpx; paths = []; real = httpx.Client.send\n"
            "def send(self, request, *a, **k):\n"
            "    paths.append(request.url.path); return real(self, request, *a, **k)\n"
            "httpx.Client.send = send\n"
            "import pflatents\n"
            f"pflatents.extract({str(data)!r}, 'gmm:{model}', {str(tmp_path / 's.zarr')!r}, solver='rk4', steps=4)\n"
            "print(' '.join(paths))")
    env = {**os.environ, "PREFECT_API_URL": prefect_api}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    paths = res.stdout.strip().splitlines()[-1].split()
    assert "/api/flow_runs/" in paths  # the recorder saw the run's requests
    assert not [p for p in paths if p.endswith("/admin/storage")], paths


def test_our_server_gets_no_csrf_token_request_unless_protection_is_on(monkeypatch):
    import prefect.context
    from prefect.settings import PREFECT_SERVER_API_CSRF_PROTECTION_ENABLED

    ctx = prefect.context.GLOBAL_SETTINGS_CONTEXT
    before = ctx.settings
    assert before.client.csrf_support_enabled is True  # Prefect's default: a token request per client
    monkeypatch.setattr(ctx, "settings", before)
    server._settings_for_our_server("http://127.0.0.1:1/api", reread=False)
    assert ctx.settings.client.csrf_support_enabled is False
    assert ctx.settings.api.url == "http://127.0.0.1:1/api"
    monkeypatch.setattr(ctx, "settings", before.copy_with_update(
        updates={PREFECT_SERVER_API_CSRF_PROTECTION_ENABLED: True}))
    server._settings_for_our_server("http://127.0.0.1:1/api", reread=False)
    assert ctx.settings.client.csrf_support_enabled is True
