"""One Prefect task covering several shards: latents, records and resume stay per shard (chunk)."""

from __future__ import annotations

import json
import threading
from collections import Counter

import numpy as np
import pytest
import zarr

from extract_helpers import write_gmm_job
from pflatents.flows.cli import main
from pflatents.flows.extract import MAX_TASKS, shards_per_task
from pflatents.storage import LatentStore

FIXED = ["--solver", "rk4", "--steps", "8"]


def test_shards_per_task_rule():
    # an explicit setting wins
    assert shards_per_task(10, 100, 100, workers=1, setting=3) == 3
    # enough shards for 8 batches when there is plenty of work ...
    assert shards_per_task(1000, 682, 4096, workers=1) == 49          # ceil(8 * 4096 / 682)
    # ... but each worker keeps 4 tasks to share
    assert shards_per_task(12, 100, 100, workers=1) == 3
    assert shards_per_task(12, 100, 100, workers=3) == 1
    assert shards_per_task(0, 100, 100) == 1
    # a 1e9-sample store of 32x32x3 patches (682-sample chunks): thousands of task runs, not millions
    n = -(-10**9 // 682)
    k = shards_per_task(n, 682, 4096, workers=8)
    assert 1000 <= -(-n // k) <= MAX_TASKS


@pytest.fixture
def job(tmp_path):
    data, model = write_gmm_job(tmp_path, n=600)
    return tmp_path, data, model


def _extract(tmp, data, model, out, *extra):
    return main(["extract", "--data", str(data), "--model", f"gmm:{model}", "--out", str(tmp / out),
                 "--shard-size", "100", "--batch-size", "50", "--no-progress", *FIXED, *extra])


@pytest.fixture
def writes(monkeypatch):
    """Counts LatentStore.write_shard calls per shard id (tasks run in this process's threads);
    ``fail_write`` makes the writes of the shard ids it holds raise an OSError."""
    counts: Counter = Counter()
    fail_write: set[int] = set()
    lock = threading.Lock()
    original = LatentStore.write_shard

    def counting(self, shard_id, *a, **kw):
        with lock:
            counts[shard_id] += 1
        if shard_id in fail_write:
            raise OSError(f"injected write failure of shard {shard_id}")
        return original(self, shard_id, *a, **kw)

    monkeypatch.setattr(LatentStore, "write_shard", counting)
    return counts, fail_write


def _records(url):
    return LatentStore.open(url, mode="r").shard_records()


def test_grouped_run_equals_one_shard_per_task(job, prefect_api, writes):
    tmp, data, model = job
    assert _extract(tmp, data, model, "ref.zarr", "--shards-per-task", "1") == 0
    counts, _ = writes
    counts.clear()
    assert _extract(tmp, data, model, "out.zarr", "--shards-per-task", "4") == 0   # tasks of 4 and 2 shards
    assert counts == Counter({i: 1 for i in range(6)})
    ref, out = zarr.open_group(str(tmp / "ref.zarr"), mode="r"), zarr.open_group(str(tmp / "out.zarr"), mode="r")
    np.testing.assert_array_equal(out["latents"][:], ref["latents"][:])
    np.testing.assert_array_equal(out["nfe"][:], ref["nfe"][:])
    records = _records(str(tmp / "out.zarr"))
    assert sorted(records) == list(range(6)) and all(r["state"] == "done" for r in records.values())


def test_failed_shard_in_a_group_leaves_the_others_done_and_resume_redoes_only_it(job, prefect_api, writes,
                                                                                  monkeypatch, capsys):
    tmp, data, model = job
    assert _extract(tmp, data, model, "ref.zarr", "--shards-per-task", "1") == 0
    counts, _ = writes
    counts.clear()
    log = tmp / "faults.log"
    monkeypatch.setenv("PFLATENTS_FAIL_SHARDS", "1")
    monkeypatch.setenv("PFLATENTS_FAULT_LOG", str(log))
    capsys.readouterr()
    assert _extract(tmp, data, model, "out.zarr", "--shards-per-task", "3", "--retries", "2") == 1
    err = capsys.readouterr().err
    assert "[1]" in err and "Traceback" not in err
    url = str(tmp / "out.zarr")
    # a deterministic failure is not retried; its group mates 0 and 2 were written once and are done
    assert log.read_text().splitlines() == [f"{url} 1 permanent"]
    assert counts == Counter({0: 1, 2: 1, 3: 1, 4: 1, 5: 1})
    assert main(["status", url, "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert (st["done"], st["failed"], st["pending"]) == (5, 1, 0)
    assert [f["id"] for f in st["failed_shards"]] == [1] and "injected" in st["failed_shards"][0]["error"]
    before = _records(url)
    monkeypatch.delenv("PFLATENTS_FAIL_SHARDS")
    counts.clear()
    assert main(["resume", url, "--no-progress", "--shards-per-task", "3"]) == 0
    assert counts == Counter({1: 1})                                    # only the failed chunk is redone
    after = _records(url)
    assert all(after[i] == before[i] for i in (0, 2, 3, 4, 5))
    ref, out = zarr.open_group(str(tmp / "ref.zarr"), mode="r"), zarr.open_group(url, mode="r")
    np.testing.assert_array_equal(out["latents"][:], ref["latents"][:])
    np.testing.assert_array_equal(out["nfe"][:], ref["nfe"][:])


def test_transient_failure_retries_the_task_without_redoing_done_shards(job, prefect_api, writes, monkeypatch):
    tmp, data, model = job
    counts, _ = writes
    log = tmp / "faults.log"
    monkeypatch.setenv("PFLATENTS_FAIL_ONCE", "1")
    monkeypatch.setenv("PFLATENTS_FAULT_LOG", str(log))
    assert _extract(tmp, data, model, "out.zarr", "--shards-per-task", "3", "--retries", "1") == 0
    assert log.read_text().splitlines() == [f"{tmp / 'out.zarr'} 1 transient"]
    assert counts == Counter({i: 1 for i in range(6)})     # the retry skipped shards 0 and 2
    assert all(r["state"] == "done" for r in _records(str(tmp / "out.zarr")).values())


def test_failed_write_fails_that_chunk_only(job, prefect_api, writes, capsys):
    tmp, data, model = job
    counts, fail_write = writes
    fail_write.add(2)
    assert _extract(tmp, data, model, "out.zarr", "--shards-per-task", "3", "--retries", "1") == 1
    assert "[2]" in capsys.readouterr().err
    # an OSError can change on retry: the task was retried once, redoing only shard 2
    assert counts == Counter({0: 1, 1: 1, 2: 2, 3: 1, 4: 1, 5: 1})
    records = _records(str(tmp / "out.zarr"))
    assert records[2]["state"] == "failed" and "injected write failure" in records[2]["error"]
    assert all(records[i]["state"] == "done" for i in (0, 1, 3, 4, 5))
