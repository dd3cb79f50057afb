"""Prefect's dashboard with a pflatents extract in it, in headless Chromium: find the run, take a screenshot.

Starts a real Prefect server with its UI on a free loopback port (the UI's API URL pointed at that
port), runs a small GMM extract against it with the real CLI, then loads the dashboard's flow-runs
page in headless Chromium (Debian's ``chromium``) and looks for the run by its name, and screenshots
the run's own page (name, tags, task runs named by shards, the Logs tab). Used by
tests/test_dashboard_browser.py; run by hand it writes docs/dashboard-extract.png:

    .venv/bin/python -m benchmarks dashboard --png docs/dashboard-extract.png
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import urllib.request
from pathlib import Path

from benchmarks.common.jobs import BIN, start_prefect_server, stop, write_job
from benchmarks.common.report import md_table


def chromium() -> str | None:
    """Debian's chromium (or chromium-browser / google-chrome), None when none is installed."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def start_ui_server(home: Path, timeout: float = 240) -> tuple[subprocess.Popen, str]:
    """``prefect server start`` with its UI on a free port; returns (process, UI URL)."""
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}
    return start_prefect_server(env, log=home / "server.log", timeout=timeout, ui=True)


def run_extract(work: Path, ui_url: str, name: str = "s.zarr", n: int = 20000) -> subprocess.CompletedProcess:
    data, model = write_job(work, n, dim=8, k=2)
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_LOGGING_LEVEL"}
    env.update(PREFECT_API_URL=f"{ui_url}/api", PREFECT_HOME=str(work / "home"))
    return subprocess.run([str(BIN / "pflatents"), "extract", "--data", str(data), "--model", f"gmm:{model}",
                           "--out", str(work / name), "--solver", "rk4", "--steps", "20", "--shard-size", "2500",
                           "--shards-per-task", "2", "--no-progress"], env=env, capture_output=True, text=True,
                          timeout=600)


def flow_run(ui_url: str) -> dict:
    req = urllib.request.Request(f"{ui_url}/api/flow_runs/filter", data=b'{"sort": "START_TIME_DESC"}',
                                 headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())[0]


def browse(url: str, *, png: Path | None = None, budget_ms: int = 30000, size: str = "1400,1000") -> str:
    """Load ``url`` in headless Chromium; returns the rendered DOM (and writes a screenshot to ``png``)."""
    exe = chromium()
    if exe is None:
        raise FileNotFoundError("chromium is not installed (apt-get install -y chromium)")
    base = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--window-size={size}",
            f"--virtual-time-budget={budget_ms}"]
    with tempfile.TemporaryDirectory() as profile:
        base.append(f"--user-data-dir={profile}")
        dom = subprocess.run([*base, "--dump-dom", url], capture_output=True, text=True, timeout=180).stdout
        if png is not None:
            subprocess.run([*base, f"--screenshot={png}", url], capture_output=True, timeout=180, check=True)
    return dom


def listed(ui_url: str, name: str) -> bool:
    """Whether the dashboard's flow-runs page shows a run called ``name`` (the list renders after the
    API answers: a longer virtual-time budget on a second try)."""
    return any(name in browse(f"{ui_url}/runs", budget_ms=budget) for budget in (20000, 60000))


def main(argv: list[str] | None = None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks dashboard", description=__doc__.splitlines()[0])
    ap.add_argument("--png", type=Path, default=Path("docs/dashboard-extract.png"))
    ap.add_argument("--samples", type=int, default=20000)
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="pflatents-dashboard-") as tmp:
        work = Path(tmp)
        (work / "home").mkdir()
        proc, ui = start_ui_server(work / "home")
        try:
            res = run_extract(work, ui, n=a.samples)
            print(res.stdout.strip(), res.stderr.strip(), sep="\n")
            run = flow_run(ui)
            found = listed(ui, run["name"])
            print(f"flow-runs page lists {run['name']!r}: {found}")
            browse(f"{ui}/runs/flow-run/{run['id']}", png=a.png.resolve())
            print(f"screenshot of {ui}/runs/flow-run/{run['id']} -> {a.png} ({a.png.stat().st_size // 1024} KB)\n")
            print(md_table(["flow run", "on the flow-runs page", "screenshot"],
                           [[run["name"], "yes" if found else "no", f"{a.png} ({a.png.stat().st_size // 1024} KB)"]]))
        finally:
            stop(proc)
    return {"flow_run": run["name"], "listed": found, "png": str(a.png), "png_bytes": a.png.stat().st_size}

