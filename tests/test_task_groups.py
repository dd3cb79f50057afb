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


def _extract(tmp, data, model, out, *extra, batch=50, solver=FIXED):
    return main(["extract", "--data", str(data), "--model", f"gmm:{model}", "--out", str(tmp / out),
                 "--shard-size", "100", "--batch-size", str(batch), "--no-progress", *solver, *extra])


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
    """dopri5 with batches of 64 in shards of 100: batches stay per shard (a dopri5 latent changes in
    the last bits with its batch mates, so batches spanning shards would differ from this reference)."""
    tmp, data, model = job
    run = {"batch": 64, "solver": ["--solver", "dopri5"]}
    assert _extract(tmp, data, model, "ref.zarr", "--shards-per-task", "1", **run) == 0
    counts, _ = writes
    counts.clear()
    assert _extract(tmp, data, model, "out.zarr", "--shards-per-task", "4", **run) == 0   # tasks of 4 and 2 shards
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


def test_writer_thread_overlaps_the_next_integration_and_fails_only_its_chunk(tmp_path, monkeypatch):
    """run_shards with the writer thread (the GPU default), no Prefect: shard 0's write waits until
    shard 1's integration has started (it would time out without the overlap); a failed write fails
    that chunk only; latents equal the sequential run's."""
    import pflatents.tasks.wrappers.extract as wrapper
    from pflatents.flows.coordinator import Job, make_store, prepare
    from pflatents.tasks.wrappers.extract import ShardGroupFailed, run_shards

    data, model = write_gmm_job(tmp_path, n=400)

    def store(name):
        job = Job(data=str(data), model=f"gmm:{model}", out=str(tmp_path / name), solver="rk4", steps=8,
                  shard_size=100, batch_size=50).resolved()
        make_store(prepare(job))
        return job.out

    ref = store("ref.zarr")
    assert [r["shard_id"] for r in run_shards(ref, [0, 1, 2, 3], "cpu", overlap=False)] == [0, 1, 2, 3]

    started: list[int] = []
    second_started = threading.Event()
    encode, write = wrapper.encode_block, LatentStore.write_shard
    waited: dict[int, bool] = {}

    def encoding(model, sde, block, *a, **kw):
        started.append(len(started))
        if len(started) == 2:
            second_started.set()
        return encode(model, sde, block, *a, **kw)

    def writing(self, shard_id, *a, **kw):
        if shard_id == 0:
            waited[0] = second_started.wait(60)
        if shard_id == 2:
            raise OSError("injected write failure of shard 2")
        return write(self, shard_id, *a, **kw)

    monkeypatch.setattr(wrapper, "encode_block", encoding)
    monkeypatch.setattr(LatentStore, "write_shard", writing)
    out = store("out.zarr")
    with pytest.raises(ShardGroupFailed) as e:
        run_shards(out, [0, 1, 2, 3], "cpu", overlap=True)
    assert waited == {0: True}
    assert sorted(e.value.failures) == [2] and "injected write failure" in e.value.failures[2]
    assert e.value.retryable and [r["shard_id"] for r in e.value.results] == [0, 1, 3]
    records = LatentStore.open(out, mode="r").shard_records()
    assert {i: r["state"] for i, r in records.items() if r["state"] == "done"} == {0: "done", 1: "done", 3: "done"}
    a, b = zarr.open_group(ref, mode="r"), zarr.open_group(out, mode="r")
    for i in (0, 1, 3):
        np.testing.assert_array_equal(b["latents"][i * 100:(i + 1) * 100], a["latents"][i * 100:(i + 1) * 100])
    # a retry (as Prefect's) skips the done shards and writes only shard 2
    monkeypatch.setattr(LatentStore, "write_shard", write)
    res = run_shards(out, [0, 1, 2, 3], "cpu", overlap=True)
    assert [r.get("skipped", False) for r in res] == [True, True, False, True]
    np.testing.assert_array_equal(zarr.open_group(out, mode="r")["latents"][:], a["latents"][:])


def test_a_task_that_fails_as_a_whole_names_each_of_its_shards(job, prefect_api, monkeypatch, capsys):
    import pflatents.tasks.wrappers.extract as wrapper

    tmp, data, model = job

    def no_model(*a, **kw):
        raise RuntimeError("injected: the model did not load")

    monkeypatch.setattr(wrapper, "load_model", no_model)
    assert _extract(tmp, data, model, "out.zarr", "--shards-per-task", "4", "--retries", "0") == 1
    assert "[0, 1, 2, 3, 4, 5]" in capsys.readouterr().err
    records = _records(str(tmp / "out.zarr"))
    assert sorted(records) == list(range(6))
    assert all(r["state"] == "failed" and "did not load" in r["error"] for r in records.values())
