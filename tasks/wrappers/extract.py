"""The unit of extraction work: encode a group of shards and write each to the store (thin Prefect wrapper).

Tasks receive a store URL and shard ids, never tensors; the pinned config in the store says what to
do. Sources and models are cached per worker process, so each is opened/loaded once, not per shard.

One task covers one or more shards (``run_shards``), but each shard (one store chunk) keeps its own
batches, write, read-back verification and record, exactly as a one-shard task would: latents do not
depend on how shards are grouped, and kill/resume stays per shard. A shard that fails does not stop
its group mates; the task then raises ``ShardGroupFailed`` naming each failed shard, which Prefect
retries only when one of those errors can change on retry, and a retry skips the shards already done.
On a GPU, while a shard is written and verified (a writer thread), the next shard is integrated.

Prefect retries a failed shard only when its error can change on retry (``can_change_on_retry``):
I/O, network, memory, a read-back mismatch. A sample the solver cannot finish is not an error: it is
stored flagged (``LatentStore.write_shard(status=...)``) and the shard is done.

Fault injection for tests and operators: ``PFLATENTS_FAIL_SHARDS="3,7"`` makes those shards fail on
every attempt (a deterministic error: not retried); ``PFLATENTS_FAIL_ONCE="3"`` makes shard 3 of each
store fail on its first attempt in a process only (a transient error that a retry fixes);
``PFLATENTS_FAIL_SHARDS_FILE=path`` makes the shards listed in that file (comma-separated) fail while
the file exists (for long-lived servers and scheduled runs). With ``PFLATENTS_FAULT_LOG=path`` every
injected failure appends a line ``<store> <shard> <kind>`` there, so a test can tell that it happened.
"""

from __future__ import annotations

import dataclasses
from typing import Any
import functools
import json
import os
import socket
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

from prefect import task
from prefect.cache_policies import NO_CACHE

import numpy as np

from pflatents.storage import LatentStore, ShardVerifyError, StoreLockedError
from pflatents.tasks.errors import InputError
from pflatents.tasks.ode.batches import encode_block
from pflatents.tasks.models.registry import load_model, resolve_device
from pflatents.tasks.data.registry import stat_path
from pflatents.tasks.data.sources import open_source
from pflatents.tasks.ode.pfode import SolverConfig

__all__ = ["run_shard", "run_shards", "nfe_stats", "log_group", "ShardGroupFailed", "done_summary", "retry_samples", "integrate_shards", "retry_shard_samples", "can_change_on_retry",
           "stricter", "InjectedFault", "TransientFault"]

_failed_once: set[tuple[str, int]] = set()
_lock = threading.Lock()


class InjectedFault(RuntimeError):
    """Raised by the fault-injection hook (a permanent failure: not retried)."""


class TransientFault(InjectedFault):
    """An injected failure that a retry fixes."""


class ShardGroupFailed(RuntimeError):
    """Some shards of a task's group failed; the others were written and recorded done.

    ``failures`` maps shard id to ``"ErrorType: message"``, ``results`` holds the summaries of the
    group's shards that are done, ``retryable`` says whether any failure can change on retry."""

    def __init__(self, failures: dict[int, str], results: list[dict], retryable: bool) -> None:
        self.failures, self.results, self.retryable = dict(failures), list(results), bool(retryable)
        first = min(self.failures)
        super().__init__(f"{len(self.failures)} of {len(self.failures) + len(self.results)} shard(s) of the task "
                         f"failed: {sorted(self.failures)}; first (shard {first}): {self.failures[first]}")

    def __reduce__(self):  # pickled by dask process workers
        return (ShardGroupFailed, (self.failures, self.results, self.retryable))


def _ids(var: str) -> set[int]:
    return {int(v) for v in os.environ.get(var, "").replace(" ", "").split(",") if v}


def _file_ids(var: str) -> set[int]:
    path = os.environ.get(var)
    try:
        text = open(path).read() if path else ""
    except OSError:
        return set()
    return {int(v) for v in text.replace(" ", "").replace("\n", ",").split(",") if v}


def _inject_fault(store_url: str, shard_id: int) -> None:
    if shard_id in _ids("PFLATENTS_FAIL_SHARDS") or shard_id in _file_ids("PFLATENTS_FAIL_SHARDS_FILE"):
        _log_fault(store_url, shard_id, "permanent")
        raise InjectedFault(f"injected failure of shard {shard_id} (PFLATENTS_FAIL_SHARDS)")
    with _lock:
        if shard_id in _ids("PFLATENTS_FAIL_ONCE") and (store_url, shard_id) not in _failed_once:
            _failed_once.add((store_url, shard_id))
            _log_fault(store_url, shard_id, "transient")
            raise TransientFault(f"injected transient failure of shard {shard_id} (PFLATENTS_FAIL_ONCE)")


def _log_fault(store_url: str, shard_id: int, kind: str) -> None:
    path = os.environ.get("PFLATENTS_FAULT_LOG")
    if path:
        with open(path, "a") as f:
            f.write(f"{store_url} {shard_id} {kind}\n")


@functools.lru_cache(maxsize=4)
def _source_cached(spec: str, options: str, stamp: tuple):
    return open_source(spec, **json.loads(options))


def _source(data, stop: int = 0):
    """The job's source (the pinned ``data``: spec and options), opened once per worker process
    (re-opened if the file changed, or if it grew past the cached length: a growing source's new
    samples are read from a fresh open)."""
    spec = data.spec
    options = json.dumps(data.options or {}, sort_keys=True)
    try:
        st = os.stat(stat_path(spec) or "")
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
    except OSError:
        stamp = ()
    src = _source_cached(spec, options, stamp)
    if len(src) < stop:
        _source_cached.cache_clear()
        src = _source_cached(spec, options, stamp)
    return src


def can_change_on_retry(exc: BaseException | None) -> bool:
    """True for errors that a retry of the same shard may not repeat: I/O and network errors, lost
    workers, memory pressure, a read-back mismatch, an injected transient fault. Errors that follow
    from the inputs (bad data or settings, a mismatched or locked store, a lost lock, an injected
    permanent fault, programming errors) would fail the same way again and are not retried."""
    if isinstance(exc, ShardGroupFailed):
        return exc.retryable
    if isinstance(exc, (TransientFault, ShardVerifyError)):
        return True
    deterministic = (InjectedFault, StoreLockedError, ValueError, TypeError, LookupError, AttributeError,
                     ArithmeticError, NotImplementedError, AssertionError)
    return exc is not None and not isinstance(exc, deterministic)


def _retry_condition(task, task_run, state) -> bool:
    """Prefect's ``retry_condition_fn``: retry a failed attempt only if its error can change."""
    exc = state.data if isinstance(getattr(state, "data", None), BaseException) else None
    return can_change_on_retry(exc)


@dataclasses.dataclass(frozen=True)
class ShardContext:
    """What a task needs for its shards: the store (fenced on the coordinator's lock token), the job
    pinned in it, the SDE, the device and the model (as pinned)."""

    store: LatentStore
    cfg: Any
    sde: Any
    device: Any
    model: Any


def _context(store_url: str, device: str, lease: str | None) -> ShardContext:
    from pflatents.tasks.config import ExtractConfig

    store = LatentStore.open(store_url)
    store.fence(lease)
    cfg = ExtractConfig.from_store(store)
    if (cfg.pilot or {}).get("state") == "pending":  # the extract flow runs the pilot first; never a shard before it
        raise InputError(f"the --latent-tol pilot of {store_url} has not chosen the solver yet; run `pflatents "
                         f"resume {store_url}` (it runs the pilot first)")
    sde, dev = cfg.make_sde(), resolve_device(device)
    return ShardContext(store, cfg, sde, dev, load_model(cfg.model.spec, sde, precision=cfg.precision,
                                                          compile=cfg.compile))


@dataclasses.dataclass(frozen=True)
class Encoded:
    """One shard integrated: latents, NFE and status per sample, the record's info, the summary and the
    source's rows (``Batch``: their ids and labels are stored with the latents)."""

    z: np.ndarray
    nfe: np.ndarray
    status: np.ndarray
    info: dict
    summary: dict
    batch: Any


def _encode(ctx: ShardContext, store_url: str, shard_id: int) -> Encoded:
    """Read and integrate one shard (the summary's time leaves out the write; the source's batch comes
    back too: its ids and labels are written with the latents)."""
    t0 = time.perf_counter()
    _inject_fault(store_url, shard_id)
    store, cfg, sde, dev, model = ctx.store, ctx.cfg, ctx.sde, ctx.device, ctx.model
    start, stop = store.shard_range(shard_id)
    batch = _source(cfg.data, stop).read(start, stop)
    t1 = time.perf_counter()
    # labels only where the source has them or --class-label pinned one (else encode_block as before)
    cond = cfg.cond_labels(batch.labels, stop - start)
    labelled = {} if cond is None else {"labels": cond}
    z, nfe, status = encode_block(model, sde, batch.x, cfg.make_solver(), cfg.batch_size, dev, cfg.dtype,
                                  **labelled)
    t2 = time.perf_counter()
    info = {"timings": {"read_s": t1 - t0, "integrate_s": t2 - t1}, "device": str(dev),
            "host": socket.gethostname(), "pid": os.getpid(), "network": _network_status(model, dev)}
    summary = {"shard_id": shard_id, "n": stop - start, **nfe_stats(nfe), "seconds": t2 - t0,
               "device": str(dev), "samples_failed": int((status != 0).sum())}
    return Encoded(z, nfe, status, info, summary, batch)


def nfe_stats(nfe) -> dict:
    """Sum, sum of squares, min and max of per-sample NFE counts: what a run's NFE statistics add up from."""
    a = np.asarray(nfe, dtype=np.int64)
    if a.size == 0:
        return {"nfe_sum": 0, "nfe_sumsq": 0, "nfe_min": None, "nfe_max": None}
    return {"nfe_sum": int(a.sum()), "nfe_sumsq": int((a * a).sum()), "nfe_min": int(a.min()), "nfe_max": int(a.max())}


def run_shard(store_url: str, shard_id: int, device: str = "auto", lease: str | None = None) -> dict:
    """Encode shard ``shard_id`` of the store's pinned job and write it; returns a small summary.

    Samples the solver cannot finish (step limit, non-finite) do not fail the shard: they are stored
    flagged, with NaN latents (``LatentStore.failed_mask``), and counted in the summary."""
    t0 = time.perf_counter()
    ctx = _context(store_url, device, lease)
    e = _encode(ctx, store_url, shard_id)
    ctx.store.write_shard(shard_id, e.z, e.nfe, e.info, status=e.status, ids=e.batch.ids, labels=e.batch.labels)
    return {**e.summary, "seconds": time.perf_counter() - t0}


def done_summary(store: LatentStore, shard_id: int) -> dict | None:
    """The summary of a done shard, from its record and stored NFE (None if it is not done)."""
    record = store.shard_record(shard_id)
    if not record or record.get("state") != "done":
        return None
    start, stop = store.shard_range(shard_id)
    return {"shard_id": shard_id, "n": stop - start, **nfe_stats(np.asarray(store.nfe_array()[start:stop])),
            "seconds": 0.0, "device": (record.get("info") or {}).get("device"),
            "samples_failed": int(record.get("samples_failed") or 0), "skipped": True}


def run_shards(store_url: str, shard_ids: list[int], device: str = "auto", lease: str | None = None,
               overlap: bool | None = None) -> list[dict]:
    """Encode and write each of ``shard_ids`` as ``run_shard`` would; returns their summaries in order.

    Shards already done (by an earlier attempt of this task) are skipped and summarised from their
    records. Each shard is written, verified and recorded on its own; with ``overlap`` the write and
    verification run in a writer thread while the next shard is integrated (at most one shard waits
    to be written). ``overlap=None``: on a CUDA device only; on the CPU the writer competes with
    torch's threads for the cores (benchmarks/cases/task_groups.py measured no gain on a 2-core VM).
    A failed shard does not stop the others; if any failed, ``ShardGroupFailed`` is raised at the end.
    A lost lock (``StoreLockedError``) stops the task at once."""
    ctx = _context(store_url, device, lease)
    store = ctx.store
    if overlap is None:
        overlap = ctx.device.type == "cuda"
    results: dict[int, dict] = {}
    failures: dict[int, BaseException] = {}
    waiting: tuple[int, Future, dict, float] | None = None

    def finish(item) -> None:
        sid, fut, summary, t0 = item
        try:
            fut.result()
            results[sid] = {**summary, "seconds": time.perf_counter() - t0}
        except StoreLockedError:
            raise
        except Exception as e:  # noqa: BLE001 - recorded per shard, raised below
            failures[sid] = e

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="pflatents-writer") as writer:
        for sid in shard_ids:
            done = done_summary(store, sid)
            if done is not None:
                results[sid] = done
                continue
            t0 = time.perf_counter()
            try:
                e = _encode(ctx, store_url, sid)
            except StoreLockedError:
                raise
            except Exception as err:  # noqa: BLE001
                failures[sid] = err
                continue
            if waiting is not None:
                finish(waiting)
                waiting = None
            fut = writer.submit(store.write_shard, sid, e.z, e.nfe, e.info, status=e.status, ids=e.batch.ids,
                                labels=e.batch.labels)
            waiting = (sid, fut, e.summary, t0)
            if not overlap:
                finish(waiting)
                waiting = None
        if waiting is not None:
            finish(waiting)
    if failures:
        raise ShardGroupFailed({sid: f"{type(e).__name__}: {e}" for sid, e in failures.items()},
                               [results[s] for s in shard_ids if s in results],
                               any(can_change_on_retry(e) for e in failures.values()))
    return [results[s] for s in shard_ids]


def _network_status(model, dev) -> dict:
    """How the network ran on ``dev``: the pinned precision, and compiled / eager / failed (with why)."""
    return model.network_status(dev)


def stricter(solver: SolverConfig) -> SolverConfig:
    """The setting flagged samples are retried with: an adaptive solver gets 10x the step limit and
    10x tighter tolerances, a fixed-step solver 4x the steps (the state is also integrated in float64)."""
    if solver.adaptive:
        return dataclasses.replace(solver, max_steps=solver.max_steps * 10, rtol=solver.rtol / 10,
                                   atol=solver.atol / 10)
    return dataclasses.replace(solver, steps=solver.steps * 4)


def retry_samples(store_url: str, shard_id: int, device: str = "auto", lease: str | None = None) -> dict:
    """Re-integrate the flagged samples of a done shard with ``stricter`` settings in float64.

    The shard's other samples are kept bit for bit; samples that now finish get their latents, the
    rest stay flagged. The shard record notes how many were retried and recovered, and the setting."""
    t0 = time.perf_counter()
    ctx = _context(store_url, device, lease)
    store, cfg, sde, dev, model = ctx.store, ctx.cfg, ctx.sde, ctx.device, ctx.model
    start, stop = store.shard_range(shard_id)
    before = store.sample_status(start, stop)
    idx = np.flatnonzero(before)
    if idx.size == 0:
        return {"shard_id": shard_id, "n": 0, "nfe_sum": 0, "seconds": 0.0, "device": str(dev), "samples_failed": 0}
    batch = _source(cfg.data, stop).read(start, stop)
    cond = cfg.cond_labels(batch.labels, stop - start)
    block, labels = batch.x[idx], None if cond is None else cond[idx]
    solver = stricter(cfg.make_solver())
    z, nfe, status = encode_block(model, sde, block, solver, cfg.batch_size, dev, "float64",
                                  **({} if labels is None else {"labels": labels}))
    latents, counts = store.read_shard(shard_id)
    latents[idx], counts[idx] = z, nfe
    after = before.copy()
    after[idx] = status
    info = {"device": str(dev), "host": socket.gethostname(), "pid": os.getpid(),
            "retried_samples": {"n": int(idx.size), "recovered": int((status == 0).sum()),
                                "solver": solver.to_dict(), "dtype": "float64"},
            "timings": {"integrate_s": time.perf_counter() - t0}}
    ids, labels = store.read_ids_labels(start, stop)  # kept as they are, like the shard's other samples
    store.write_shard(shard_id, latents, counts, info, status=after, ids=ids, labels=labels)
    return {"shard_id": shard_id, "n": int(idx.size), **nfe_stats(nfe), "seconds": time.perf_counter() - t0,
            "device": str(dev), "samples_failed": int((after != 0).sum())}


_TASK = dict(retries=2, retry_delay_seconds=1, retry_condition_fn=_retry_condition, cache_policy=NO_CACHE,
             persist_result=False)


def log_group(shard_ids: list[int], results: list[dict], failures: dict[int, str], seconds: float,
              what: str = "shards") -> str:
    """The task's INFO line in Prefect's run log (the dashboard's Logs tab): its shards, samples,
    samples/s, mean NFE and samples the solver flagged; failed shards with their first error."""
    from prefect.logging import get_run_logger

    from pflatents.storage.layout import shard_label

    fresh = [r for r in results if not r.get("skipped")]
    n = sum(r["n"] for r in fresh)
    nfe = sum(r["nfe_sum"] for r in fresh)
    flagged = sum(r.get("samples_failed", 0) for r in results)
    what = what if what != "shards" or len(shard_ids) > 1 else "shard"
    line = (f"{what} {shard_label(shard_ids)}: {n} samples in {seconds:.2f} s ({n / seconds if seconds > 0 else 0:.0f} "
            f"samples/s), mean NFE {nfe / n if n else 0:.1f}, {flagged} failed sample(s)")
    skipped = len(results) - len(fresh)
    if skipped:
        line += f", {skipped} shard(s) done by an earlier attempt"
    if failures:
        first = min(failures)
        line += f"; {len(failures)} shard(s) failed: {shard_label(failures)} (shard {first}: {failures[first]})"
    logger = get_run_logger()
    (logger.warning if failures else logger.info)(line)
    return line


@task(name="integrate_shards", **_TASK)
def integrate_shards(store_url: str, shard_ids: list[int], device: str = "auto", lease: str | None = None) -> list[dict]:
    """Encode a group of shards, each written, verified and recorded done on its own (``run_shards``);
    logs one INFO line (``log_group``)."""
    t0 = time.perf_counter()
    try:
        results = run_shards(store_url, shard_ids, device, lease)
    except ShardGroupFailed as e:
        log_group(shard_ids, e.results, e.failures, time.perf_counter() - t0)
        raise
    log_group(shard_ids, results, {}, time.perf_counter() - t0)
    return results


@task(name="retry_samples", **_TASK)
def retry_shard_samples(store_url: str, shard_id: int, device: str = "auto", lease: str | None = None) -> dict:
    """Re-integrate a done shard's flagged samples with a stricter setting (``resume --retry-samples``)."""
    t0 = time.perf_counter()
    result = retry_samples(store_url, shard_id, device, lease)
    log_group([shard_id], [result], {}, time.perf_counter() - t0, what="retried flagged samples of shard")
    return result
