"""Prefect's own dashboard in a real browser: a pflatents extract run is found on the flow-runs page
by its name (headless Chromium against a real Prefect server with its UI)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "dashboard", Path(__file__).resolve().parents[1] / "benchmarks" / "cases" / "dashboard.py")
shot = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(shot)


@pytest.mark.integration
@pytest.mark.timeout(600)
@pytest.mark.skipif(shot.chromium() is None, reason="Chromium is not installed (Debian: apt-get install -y chromium); "
                    "the dashboard cannot be checked in a browser here")
def test_extract_run_found_in_the_dashboard(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    proc, ui = shot.start_ui_server(home)
    try:
        res = shot.run_extract(tmp_path, ui, name="browser.zarr", n=4000)
        assert res.returncode == 0, res.stderr[-2000:]
        run = shot.flow_run(ui)
        name = "extract browser.zarr: 4000 samples, 2 shards"
        assert run["name"] == name
        assert shot.listed(ui, name)
        dom = shot.browse(f"{ui}/runs", budget_ms=30000)
        assert "Can't connect to Server API" not in dom
        for tag in ("store:browser.zarr", "model:gmm"):
            assert tag in dom
        page = shot.browse(f"{ui}/runs/flow-run/{run['id']}", budget_ms=30000, png=tmp_path / "run.png")
        assert "integrate shards 0-1" in page and "mean NFE 80.0" in page  # task runs by shards; the Logs tab
        assert (tmp_path / "run.png").stat().st_size > 10_000
    finally:
        shot.stop(proc)
