"""The unit of extraction work: encode one shard and write it to the store (thin Prefect wrapper).

Tasks receive a store URL and a shard id, never tensors; the pinned config in the store says what to
do. Sources and models are cached per worker process, so each is opened/loaded once, not per shard.

Fault injection for tests and operators: ``PFLATENTS_FAIL_SHARDS="3,7"`` makes those shards fail on
every attempt; ``PFLATENTS_FAIL_ONCE="3"`` makes shard 3 fail on its first attempt in a process only
(a transient error that a retry fixes); ``PFLATENTS_FAIL_SHARDS_FILE=path`` makes the shards listed in that
file (comma-separated) fail while the file exists (for long-lived servers and scheduled runs).
"""

from __future__ import annotations

import functools
import os
import socket
import threading
import time

from prefect import task
from prefect.cache_policies import NO_CACHE

from pflatents.storage import LatentStore
from pflatents.tasks.ode.batches import encode_block
from pflatents.tasks.models.registry import load_model, resolve_device
from pflatents.tasks.data.sources import open_source

__all__ = ["run_shard", "integrate_shard", "InjectedFault"]

_failed_once: set[int] = set()
_lock = threading.Lock()


class InjectedFault(RuntimeError):
    """Raised by the fault-injection hook."""


def _ids(var: str) -> set[int]:
    return {int(v) for v in os.environ.get(var, "").replace(" ", "").split(",") if v}


def _file_ids(var: str) -> set[int]:
    path = os.environ.get(var)
    try:
        text = open(path).read() if path else ""
    except OSError:
        return set()
    return {int(v) for v in text.replace(" ", "").replace("\n", ",").split(",") if v}


def _inject_fault(shard_id: int) -> None:
    if shard_id in _ids("PFLATENTS_FAIL_SHARDS") or shard_id in _file_ids("PFLATENTS_FAIL_SHARDS_FILE"):
        raise InjectedFault(f"injected failure of shard {shard_id} (PFLATENTS_FAIL_SHARDS)")
    with _lock:
        if shard_id in _ids("PFLATENTS_FAIL_ONCE") and shard_id not in _failed_once:
            _failed_once.add(shard_id)
            raise InjectedFault(f"injected transient failure of shard {shard_id} (PFLATENTS_FAIL_ONCE)")


@functools.lru_cache(maxsize=4)
def _source_cached(spec: str, stamp: tuple):
    return open_source(spec)


def _source(spec: str, stop: int = 0):
    """The job's source, opened once per worker process (re-opened if the file changed, or if it grew
    past the cached length: a growing source's new samples are read from a fresh open)."""
    try:
        st = os.stat(spec.removeprefix("images:").removeprefix("npydir:").split(".zarr/")[0])
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
    except OSError:
        stamp = ()
    src = _source_cached(spec, stamp)
    if len(src) < stop:
        _source_cached.cache_clear()
        src = _source_cached(spec, stamp)
    return src


def run_shard(store_url: str, shard_id: int, device: str = "auto") -> dict:
    """Encode shard ``shard_id`` of the store's pinned job and write it; returns a small summary."""
    from pflatents.tasks.config import ExtractConfig  # config (de)serialisation lives with the flows

    t0 = time.perf_counter()
    _inject_fault(shard_id)
    store = LatentStore.open(store_url)
    cfg = ExtractConfig.from_dict(store.config)
    start, stop = store.shard_range(shard_id)
    sde, dev = cfg.make_sde(), resolve_device(device)
    model = load_model(cfg.model["spec"], sde)
    block = _source(cfg.data["spec"], stop).read(start, stop)
    t1 = time.perf_counter()
    z, nfe, status = encode_block(model, sde, block, cfg.make_solver(), cfg.batch_size, dev, cfg.dtype)
    t2 = time.perf_counter()
    bad = [start + int(i) for i in (status != 0).nonzero()[0][:10]]
    if bad:
        raise RuntimeError(f"shard {shard_id}: {int((status != 0).sum())} samples did not finish "
                           f"(step limit or non-finite), first indices {bad}")
    info = {"timings": {"read_s": t1 - t0, "integrate_s": t2 - t1}, "device": str(dev),
            "host": socket.gethostname(), "pid": os.getpid()}
    store.write_shard(shard_id, z, nfe, info)
    return {"shard_id": shard_id, "n": stop - start, "nfe_sum": int(nfe.sum()), "seconds": time.perf_counter() - t0,
            "device": str(dev)}


@task(name="integrate_shard", retries=2, retry_delay_seconds=1, cache_policy=NO_CACHE, persist_result=False)
def integrate_shard(store_url: str, shard_id: int, device: str = "auto") -> dict:
    """Encode one shard and write it to the store (done only after read-back verification)."""
    return run_shard(store_url, shard_id, device)
