"""What a run shows in Prefect's dashboard (names, tags, logs, artifacts), read back from a real
server's API; and a real server SIGKILLed in the middle of a 40-shard extract."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
import zarr

from conftest import BIN, free_port, wait_http
from extract_helpers import cli, env_with, no_traceback, write_gmm_job
from pflatents.flows import dashboard


def api(url: str, path: str, body: dict) -> list | dict:
    req = urllib.request.Request(url.rstrip("/") + path, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def user_env(env: dict) -> dict:
    """The CLI's environment as a user has it: no PREFECT_LOGGING_LEVEL of the test harness."""
    env = dict(env)
    env.pop("PREFECT_LOGGING_LEVEL", None)
    return env


def flow_run_of(url: str, store: str) -> dict:
    runs = api(url, "/flow_runs/filter", {"flow_runs": {"tags": {"all_": [f"store:{store}"]}},
                                          "sort": "START_TIME_DESC"})
    assert runs, f"no flow run tagged store:{store}"
    return runs[0]


def logs_of(url: str, run_id: str, want: str, timeout: float = 20) -> list[str]:
    deadline = time.time() + timeout
    while True:
        logs = api(url, "/logs/filter", {"logs": {"flow_run_id": {"any_": [run_id]}}, "sort": "TIMESTAMP_ASC"})
        msgs = [lg["message"] for lg in logs]
        if any(want in m for m in msgs) or time.time() > deadline:
            return msgs
        time.sleep(0.5)


def test_names_and_shard_labels():
    assert dashboard.shard_label([8, 9, 10, 12, 3]) == "3, 8-10, 12"
    assert dashboard.shards_run_name("integrate", [8, 9, 10, 11]) == "integrate shards 8-11"
    assert dashboard.shards_run_name("integrate", [3]) == "integrate shard 3"
    assert dashboard.job_run_name("extract", "/data/s.zarr", 200000, 40) == "extract s.zarr: 200000 samples, 40 shards"
    assert dashboard.job_run_name("resume", "s3://b/x{1}.zarr/", 10, 1) == "resume x{{1}}.zarr: 10 samples, 1 shard"
    assert dashboard.run_tags("/data/s.zarr", "gmm") == ["pflatents", "store:s.zarr", "model:gmm"]


def test_extract_and_resume_runs_in_the_dashboard(tmp_path, cli_env, prefect_server):
    """Flow and task runs named by job and shards, tagged by store and model; INFO logs per task and per
    flow in the API (not on the terminal); the extract table artifact with exact NFE figures."""
    data, model = write_gmm_job(tmp_path, n=600, dim=4)
    name = f"dash-{uuid.uuid4().hex[:8]}.zarr"
    out = tmp_path / name
    args = ["extract", "--data", str(data), "--model", f"gmm:{model}", "--out", str(out), "--solver", "rk4",
            "--steps", "4", "--shard-size", "100", "--shards-per-task", "2", "--no-progress"]
    env = user_env(cli_env)
    res = cli(args, env=env_with(env, PFLATENTS_FAIL_SHARDS="5"))
    assert res.returncode == 1, res.stderr[-2000:]
    assert "INFO" not in res.stderr and "Task run" not in res.stderr, res.stderr  # the terminal stays quiet
    assert "stopped answering" not in res.stderr  # a busy server is not a lost one

    run = flow_run_of(prefect_server, name)
    assert run["name"] == f"extract {name}: 600 samples, 6 shards"
    assert {"pflatents", f"store:{name}", "model:gmm"} <= set(run["tags"])
    assert run["state_type"] == "FAILED"
    tasks = api(prefect_server, "/task_runs/filter", {"flow_runs": {"id": {"any_": [run["id"]]}}})
    assert sorted(t["name"] for t in tasks) == ["integrate shards 0-1", "integrate shards 2-3", "integrate shards 4-5"]
    assert all(not t["tags"] for t in tasks)  # untagged: no tag-concurrency slot per task run
    msgs = logs_of(prefect_server, run["id"], "store: ")
    line = next(m for m in msgs if m.startswith("shards 0-1: "))
    assert "200 samples in" in line and "samples/s" in line and "mean NFE 16.0" in line and "0 failed sample" in line
    failed = next(m for m in msgs if m.startswith("shards 4-5: "))
    assert "100 samples" in failed and "1 shard(s) failed: 5" in failed and "PFLATENTS_FAIL_SHARDS" in failed
    assert any(m.startswith("500 samples in") and "mean NFE 16.0" in m and "1 failed shard" in m for m in msgs), msgs
    assert f"store: {out}" in "\n".join(msgs)

    arts = api(prefect_server, "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [run["id"]]}}})
    table = next((a for a in arts if a["type"] == "table"), None)
    assert table is not None, arts
    assert table["key"] == "pflatents-extract"
    rows = {r["what"]: r["value"] for r in json.loads(table["data"])}
    assert rows["store"] == str(out)
    assert rows["shards done"].startswith("5 of 6 run") and rows["shards failed"].startswith("1: 5")
    assert rows["samples"] == "500"
    assert rows["NFE per sample"] == "mean 16.0, std 0.0, min 16, max 16"  # rk4, 4 steps: 4 evaluations each
    assert rows["solver (pinned)"] == "rk4 steps=4 grid=logsnr t_eps=0.0001"
    assert any(a["type"] == "progress" for a in arts)

    res = cli(["resume", str(out), "--json"], env=env)  # with the progress bar: it is on stderr
    assert res.returncode == 0, res.stderr[-2000:]
    outcome = json.loads(res.stdout)  # stdout holds the JSON outcome and nothing else
    assert outcome["ok"] and outcome["samples"] == 100 and outcome["shard_ids"] == [5] and outcome["store"] == str(out)
    assert "encoding" in res.stderr
    run = flow_run_of(prefect_server, name)
    assert run["name"] == f"resume {name}: 100 samples, 1 shard" and run["state_type"] == "COMPLETED"
    tasks = api(prefect_server, "/task_runs/filter", {"flow_runs": {"id": {"any_": [run["id"]]}}})
    assert [t["name"] for t in tasks] == ["integrate shard 5"]


def _store_done(store: Path) -> int:
    n = 0
    for rec in store.glob("shards/*/zarr.json"):
        try:
            n += json.loads(rec.read_text()).get("attributes", {}).get("state") == "done"
        except (OSError, ValueError):
            pass
    return n


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_server_killed_mid_extract(tmp_path):
    """SIGKILL a real Prefect server while a 40-shard extract reports to it (PREFECT_API_URL): one
    warning naming the server, no Prefect retry noise, and the job ends cleanly: exit 0 with every
    shard done, or exit 1 with the exact `pflatents resume STORE` (the store then agrees)."""
    home = tmp_path / "home"
    home.mkdir()
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = user_env(os.environ.copy())
    env.update(PREFECT_HOME=str(home), PYTHONUNBUFFERED="1")
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        wait_http(url + "/health", 180, server)
        data, model = write_gmm_job(tmp_path, n=40 * 500, dim=8)
        store = tmp_path / "s.zarr"
        job = subprocess.Popen([str(BIN / "pflatents"), "extract", "--data", str(data), "--model", f"gmm:{model}",
                                "--out", str(store), "--solver", "rk4", "--steps", "100", "--shard-size", "500",
                                "--batch-size", "500", "--shards-per-task", "1", "--no-progress"],
                               env={**env, "PREFECT_API_URL": url}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
        deadline = time.time() + 300
        while _store_done(store) < 5 and job.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        done_at_kill = _store_done(store)
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(30)
        out, err = job.communicate(timeout=400)
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
        log.close()
    assert 5 <= done_at_kill < 40, f"the server was not killed mid-run ({done_at_kill} shards done)"
    text = out + err
    assert len(text.encode()) < 4000, text[-3000:]
    assert no_traceback(text) and "--- Error logging to API" not in text, text
    assert err.count("stopped answering") == 1 and url in err, err
    g = zarr.open_group(str(store), mode="r")
    states = [json.loads((store / "shards" / f"{i:06d}" / "zarr.json").read_text())["attributes"].get("state")
              if (store / "shards" / f"{i:06d}" / "zarr.json").exists() else None for i in range(40)]
    if job.returncode == 0:
        assert states == ["done"] * 40, states
        assert "done: 20000 samples" in out and g.attrs["pflatents"]["n_samples"] == 20000
    else:
        assert job.returncode == 1, text
        assert f"pflatents resume {store}" in err, err
        assert states.count("done") < 40
