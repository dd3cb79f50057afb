"""The store lock: a kernel lock (flock) on local disks, a conditional-write lease on object stores,
fencing of record writes on the lock's token, and the coordinator's lock-first open/create."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest

from pflatents.storage import (
    LatentStore,
    LeaseLostError,
    StoreLockedError,
    open_or_create,
    store_lock,
)
from pflatents.storage.lease import LeaseLock
from store_workers import hold_lock, race_lock, shard_data

REPO = Path(__file__).resolve().parents[1]
CONFIG = {"c": 1}


def _make(path, **kw) -> LatentStore:
    return LatentStore.create(path, config=CONFIG, n_samples=10, sample_shape=(4,), shard_size=4, **kw)


# ---- local: flock --------------------------------------------------------------------------


def test_live_holder_refused_then_released(tmp_path: Path) -> None:
    path = tmp_path / "s.zarr"
    store = _make(path)
    ctx = mp.get_context("spawn")
    ready, release = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=hold_lock, args=(str(path), ready, release))
    proc.start()
    try:
        assert ready.wait(60)
        with pytest.raises(StoreLockedError, match=rf"locked by pid {proc.pid} on host .*\nwait for it"):
            store.acquire_lock({"cmd": "resume"})
        assert store.status()["lock"]["owner"] == {"cmd": "extract"}
    finally:
        release.set()
        proc.join(30)
    assert proc.exitcode == 0 and store.status()["lock"] is None
    with store.locked():
        assert store.status()["lock"]["pid"] == os.getpid()
    assert store.status()["lock"] is None
    assert (path / "lock" / "owner.json").exists()  # never deleted: a re-created file could be locked twice


def test_killed_holder_is_released_by_the_kernel(tmp_path: Path) -> None:
    path = tmp_path / "s.zarr"
    store = _make(path)
    code = textwrap.dedent(f"""
        import time
        from pflatents.storage import LatentStore
        LatentStore.open({str(path)!r}).acquire_lock({{"cmd": "extract"}})
        print("locked", flush=True)
        time.sleep(120)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, cwd=REPO, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(StoreLockedError, match=f"pid {proc.pid}"):
            store.acquire_lock()
        os.kill(proc.pid, signal.SIGKILL)
        os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)  # dead, not reaped: a zombie
        assert json.loads((path / "lock" / "owner.json").read_text())["pid"] == proc.pid  # its record is left
        assert store.status()["lock"] is None                    # ... but nobody holds the lock
        holder = store.acquire_lock()                           # taken at once, nothing to judge
        assert holder["pid"] == os.getpid() and store.status()["lock"]["token"] == holder["token"]
    finally:
        proc.kill()
        proc.wait()
        store.release_lock()


def test_racing_processes_exactly_one_holder(tmp_path: Path) -> None:
    path = tmp_path / "s.zarr"
    _make(path)
    ctx = mp.get_context("spawn")
    n, rounds = 5, 3
    barrier, results = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=race_lock, args=(str(path), barrier, rounds, results)) for _ in range(n)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0] * n
    got = [results.get(timeout=5) for _ in range(n * rounds)]
    for r in range(rounds):
        assert sum(won for rr, won in got if rr == r) == 1, got


def test_a_record_without_a_holder_does_not_block_and_one_process_cannot_lock_twice(tmp_path: Path) -> None:
    path = tmp_path / "s.zarr"
    store = _make(path)
    (path / "lock" / "owner.json").write_text(json.dumps({"token": "x", "pid": 1, "host": "elsewhere"}))
    assert store.status()["lock"] is None
    assert store.acquire_lock()["pid"] == os.getpid()
    other = LatentStore.open(path)
    other.release_lock()  # does not hold it: a no-op
    with pytest.raises(StoreLockedError, match=f"locked by pid {os.getpid()}"):
        other.acquire_lock()
    store.release_lock()
    assert other.acquire_lock()["pid"] == os.getpid()
    other.release_lock()


# ---- fencing -------------------------------------------------------------------------------


def test_writes_fenced_on_a_lost_lock_stop_and_leave_the_store_as_it_is(tmp_path: Path) -> None:
    path = tmp_path / "s.zarr"
    store = _make(path, data_prefix={"n": 10, "fingerprint": "f"})
    lock = store_lock(path)
    lock.acquire({"cmd": "extract"})
    store.fence(lock.token)
    x, nfe = shard_data(store, 0)
    store.write_shard(0, x, nfe)                              # held: written
    lock.release()
    thief = store_lock(path)
    thief.acquire({"cmd": "resume"})                          # another run holds it now
    try:
        before = store.shard_record(1), dict(LatentStore.open(path, mode="r").meta)
        with pytest.raises(LeaseLostError, match="no longer held by this run"):
            store.write_shard(1, *shard_data(store, 1))
        with pytest.raises(LeaseLostError):
            store.grow(20, {"n": 20, "fingerprint": "g"})
        with pytest.raises(LeaseLostError):
            store.mark_failed(2, "boom")
        after = store.shard_record(1), dict(LatentStore.open(path, mode="r").meta)
        assert after == before and store.shard_record(2) is None
        assert np.isnan(store.latents_array()[4:8]).all()    # the data write never started
    finally:
        thief.release()


# ---- coordinator: lock first, then open or create ------------------------------------------


def test_lock_is_taken_before_the_store_is_created(tmp_path: Path) -> None:
    from pflatents.flows.coordinator import locked
    from pflatents.storage import NotAStoreError

    path = tmp_path / "s.zarr"
    seen = []

    def create():
        seen.append(store_lock(path).holder())                # the lock is held while the store is made
        return open_or_create(path, config=CONFIG, n_samples=10, sample_shape=(4,), shard_size=4)

    with locked(create, str(path), {"command": "extract"}) as store:
        assert seen[0]["owner"] == {"command": "extract"} and store.lock_token() == seen[0]["token"]
    assert store.status()["lock"] is None and LatentStore.open(path).n_shards == 3

    def refuse():
        raise ValueError("bad config")

    fresh = tmp_path / "new.zarr"
    with pytest.raises(ValueError):
        with locked(refuse, str(fresh), {"command": "extract"}):
            pass
    assert not fresh.exists()                                  # a refused creation leaves nothing
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    with pytest.raises(NotAStoreError):
        with locked(refuse, str(foreign), {"command": "extract"}):
            pass
    assert sorted(p.name for p in foreign.iterdir()) == ["keep.txt"]  # no lock file written there


def test_two_first_runs_at_once_create_the_store_once(tmp_path: Path) -> None:
    from pflatents.flows.coordinator import locked

    path = tmp_path / "s.zarr"
    outcomes, go = [], threading.Barrier(4)

    def run():
        go.wait()
        try:
            with locked(lambda: open_or_create(path, config=CONFIG, n_samples=10, sample_shape=(4,), shard_size=4),
                        str(path), {"command": "extract"}) as store:
                store.write_shard(0, *shard_data(store, 0))
                outcomes.append("ran")
        except StoreLockedError:
            outcomes.append("refused")

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    # each run either ran or was refused; a later run never re-created (and so never wiped) the store
    assert "ran" in outcomes and len(outcomes) == 4
    store = LatentStore.open(path, mode="r")
    assert store.pending_shards() == [1, 2] and store.verify_shard(0)


# ---- fsspec: leases ------------------------------------------------------------------------


def _lease(url: str) -> LeaseLock:
    import fsspec

    fs, root = fsspec.core.url_to_fs(url)
    return LeaseLock(fs, root, url, lease_s=60)


def test_lease_on_an_fsspec_store(tmp_path: Path) -> None:
    url = f"memory://{tmp_path.name}/s.zarr"
    store = _make(url)
    store.acquire_lock()
    with pytest.raises(StoreLockedError, match=r"wait for it to finish, or for its lease to run out"):
        LatentStore.open(url).acquire_lock()
    store.release_lock()
    lock, other = _lease(url), _lease(url)
    lock.acquire()
    # a holder in another process space (a container sharing our host name) is not judged by pid
    holder = lock.holder()
    lock.fs.pipe_file(lock.remote_path, json.dumps({**holder, "pid": 999999999, "process_space": "x"}).encode())
    with pytest.raises(StoreLockedError):
        other.acquire()
    # in our process space, a dead pid is taken over at once
    lock.fs.pipe_file(lock.remote_path, json.dumps({**holder, "pid": 999999999}).encode())
    assert other.acquire()["pid"] == os.getpid()
    with pytest.raises(LeaseLostError, match="lost during the run"):
        lock.release()                                          # the token changed: noticed and reported
    # a lease that ran out is taken over, whoever held it
    rec = other.holder()
    other.fs.pipe_file(other.remote_path, json.dumps({**rec, "process_space": "x", "lease_until": 0}).encode())
    third = _lease(url)
    assert third.acquire()["token"] != rec["token"]
    with pytest.raises(LeaseLostError):
        other.check()
    third.release()
    assert third.holder() is None
