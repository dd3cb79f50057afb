"""The ``extract`` flow: map the integrate task over groups of the store's pending shards (orchestration only).

The store, not Prefect's cache, decides what is done: the caller passes the pending shard ids, the
flow groups them (``shards_per_task`` consecutive ids per task, see ``shards_per_task``), each task
writes and verifies each of its shards and records it done; failures are recorded per shard here and
make the flow run FAILED, naming the shard ids.
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import time

from prefect.artifacts import create_progress_artifact, create_table_artifact, update_progress_artifact
from prefect.futures import as_completed
from prefect.logging import get_run_logger
from prefect.states import Failed
from prefect.task_runners import ThreadPoolTaskRunner

from pflatents.flows import dashboard, progress
from pflatents.flows.fastflow import json_flow
from pflatents.storage import LatentStore, StoreLockedError
from pflatents.storage.layout import shard_label
from pflatents.tasks.errors import InputError
from pflatents.tasks.wrappers.extract import (ShardGroupFailed, done_summary, integrate_shards,
                                              retry_shard_samples)
from pflatents.tasks.wrappers.pilot import run_name as pilot_run_name, run_pilot
from pflatents.tasks.ode.pilot import pending as pilot_pending

__all__ = ["extract", "make_runner", "ShardsFailed", "shards_per_task", "MAX_TASKS", "BATCHES_PER_TASK"]

MAX_TASKS = 4096
BATCHES_PER_TASK = 8


class ShardsFailed(RuntimeError):
    """Some shards failed after their retries; the message names them."""


def _dask_runner_class():
    from prefect_dask import DaskTaskRunner

    class PicklableDaskTaskRunner(DaskTaskRunner):
        """DaskTaskRunner that pickles as its settings only.

        Prefect ships the flow (and so its task runner) to workers in the run context; a started
        runner holds a live client with locks and cannot be pickled. Workers never use it.
        """

        def __reduce__(self):
            return (_rebuild_dask_runner, (self.address, self.cluster_kwargs, self.client_kwargs))

    return PicklableDaskTaskRunner


def _rebuild_dask_runner(address, cluster_kwargs, client_kwargs):
    cls = _dask_runner_class()
    if address:
        return cls(address=address, client_kwargs=client_kwargs)
    return cls(cluster_kwargs=cluster_kwargs, client_kwargs=client_kwargs)


def make_runner(runner: str = "local", workers: int = 1):
    """local (threads), dask (prefect-dask on a LocalCluster) or dask://HOST:PORT (existing cluster)."""
    if runner == "local":
        return ThreadPoolTaskRunner(max_workers=workers)
    DaskTaskRunner = _dask_runner_class()

    if runner == "dask":
        # Process workers each need a Prefect API to report to; without PREFECT_API_URL use threads
        # (process workers would each start their own temporary server).
        processes = bool(os.environ.get("PREFECT_API_URL"))
        return DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": 1,
                                              "processes": processes, "dashboard_address": ":0"})
    if runner.startswith("dask://"):
        return DaskTaskRunner(address="tcp://" + runner.removeprefix("dask://"))
    raise InputError(f"unknown runner {runner!r}; use local, dask or dask://HOST:PORT")


def shards_per_task(n_shards: int, shard_size: int, batch_size: int, workers: int = 1,
                    setting: int | None = None) -> int:
    """How many shards one task covers: ``setting`` if given, else the automatic choice.

    Automatic: enough shards for ``BATCHES_PER_TASK`` batches per task (fewer Prefect task runs, and
    per-task set-up amortised), but no more than leaves 4 tasks per worker (so workers share the
    work), and never more than ``MAX_TASKS`` tasks in one run (a 1e9-sample store gives thousands of
    task runs, not millions). Grouping does not change latents or records (both stay per shard)."""
    if n_shards <= 0:
        return 1
    if setting is not None:
        return max(1, int(setting))
    by_batches = math.ceil(BATCHES_PER_TASK * batch_size / max(1, shard_size))
    by_workers = max(1, n_shards // (4 * max(1, workers)))
    by_cap = math.ceil(n_shards / MAX_TASKS)
    return max(1, by_cap, min(by_batches, by_workers))


def _gpu_annotation(gpu: bool):
    if not gpu:
        return contextlib.nullcontext()
    import dask

    return dask.annotate(resources={"GPU": 1})


@json_flow(name="extract", persist_result=False)
def extract(store_url: str, shard_ids: list[int], device: str = "auto", retries: int = 2,
            request_gpu: bool = False, retry_samples: bool = False, shards_per_task: int = 1):
    """Encode the given shards of a store's pinned job; FAILED (naming shard ids) if any shard fails.

    A store pinned with a pending ``--latent-tol`` pilot first runs the pilot task (``pilot: latent-tol
    E`` in the dashboard), which pins the chosen solver; the shards then run with it.

    Each task covers ``shards_per_task`` consecutive ids of ``shard_ids``; its shards are recorded,
    counted and reported one by one. ``retry_samples`` also re-integrates, with a stricter setting,
    the flagged samples of done shards (one task per shard).
    Tasks and the failure records are fenced on the token of the store lock held when the flow
    starts (the coordinator's), so a run that lost its lock stops writing. A failed run ends in a
    FAILED state carrying ``ShardsFailed`` (raised to the caller), without a traceback of its own.

    In the dashboard: task runs are named by their shards (``integrate shards 8-15``); the run's log
    ends with its summary and the store; a progress artifact follows the shards and a table artifact
    (``dashboard.extract_table``) sums the run up. If the Prefect server goes away
    (``dashboard.server_lost``), the dashboard updates are skipped and the work goes on.
    """
    store = LatentStore.open(store_url)
    lease = store.lock_token()
    store.fence(lease)
    opts = {"retries": retries, "retry_delay_seconds": 1}
    pilot = None
    if pilot_pending(store.config.get("pilot")):
        # --latent-tol: the pilot chooses the solver and pins it before any shard runs
        target = store.config["pilot"]["target"]
        with _gpu_annotation(request_gpu), dashboard.untagged():
            pilot = run_pilot.with_options(task_run_name=pilot_run_name(target)).submit(
                store_url, device, lease).result()
        store = LatentStore.open(store_url)
        store.fence(lease)
    retry_ids = [i for i in store.shards_with_failed_samples() if i not in set(shard_ids)] if retry_samples else []
    k = max(1, int(shards_per_task))
    groups = [list(shard_ids[i:i + k]) for i in range(0, len(shard_ids), k)]
    t0 = time.perf_counter()
    with _gpu_annotation(request_gpu), dashboard.untagged():
        futures = {integrate_shards.with_options(task_run_name=dashboard.shards_run_name("integrate", g),
                                                 **opts).submit(store_url, g, device, lease): g for g in groups}
        futures.update({retry_shard_samples.with_options(task_run_name=f"retry flagged samples of shard {sid}", **opts)
                        .submit(store_url, sid, device, lease): [sid] for sid in retry_ids})
    total = len(shard_ids) + len(retry_ids)
    logger = get_run_logger()
    logger.info(f"{total} shard(s) of {store_url} in {len(futures)} task(s) of up to {k} shard(s)")
    artifact = dashboard.publish(create_progress_artifact, 0.0, description=f"pflatents extract: {total} shards of "
                          f"{store_url} in {len(futures)} tasks")
    done, failures, n_samples, samples_failed = 0, {}, 0, 0
    nfe = {"nfe_sum": 0, "nfe_sumsq": 0, "nfe_min": None, "nfe_max": None}
    devices: set[str] = set()
    for fut in as_completed(list(futures)):
        group = futures[fut]
        res = fut.result(raise_on_failure=False)
        results, failed = _outcome(store, group, res)
        for sid, error in failed.items():
            failures[sid] = error
            if not isinstance(res, StoreLockedError):  # a run that lost the lock records nothing
                store.mark_failed(sid, error, {"host": socket.gethostname(), "pid": os.getpid()})
        for r in results:
            n_samples += r["n"]
            _add_nfe(nfe, r)
            samples_failed += r.get("samples_failed", 0)
            devices.update([r["device"]] if r.get("device") else [])
        done += len(group)
        if artifact is not None:
            dashboard.publish(update_progress_artifact, artifact, 100.0 * done / max(1, total))
        for hook in progress.hooks:
            for r in results:
                hook(r["n"], {"shard_id": r["shard_id"], "failed": False})
            for sid in failed:
                hook(0, {"shard_id": sid, "failed": True})
    wall = time.perf_counter() - t0
    summary = {"shards": len(shard_ids), "tasks": len(groups), "shards_per_task": k,
               "failed_shards": sorted(failures), "samples": n_samples,
               "seconds": wall, "samples_per_s": n_samples / wall if wall > 0 else 0.0,
               "mean_nfe": nfe["nfe_sum"] / n_samples if n_samples else 0.0, "samples_failed": samples_failed,
               "retried_sample_shards": retry_ids, "nfe": _nfe_summary(nfe, n_samples), "devices": sorted(devices)}
    if pilot is not None:
        summary["pilot"] = pilot
    logger.info(f"{n_samples} samples in {wall:.1f} s ({summary['samples_per_s']:.0f} samples/s), "
                f"mean NFE {summary['mean_nfe']:.1f}, {len(failures)} failed shard(s), "
                f"{samples_failed} flagged sample(s)")
    logger.info(f"store: {store_url} (`pflatents status {store_url}`)")
    dashboard.publish(create_table_artifact, dashboard.extract_table(summary, store_url, store.config, store.n_shards),
               key="pflatents-extract", description=f"pflatents extract of {store_url}")
    failed = None
    if failures:
        message = (f"{len(failures)} shard(s) failed: {sorted(failures)}; first error: "
                   f"{failures[min(failures)]}. Run `pflatents resume {store_url}` to retry them.")
        logger.warning(message)
        failed = Failed(message=message, data=ShardsFailed(message))
    dashboard.hand_over(store_url, failed.data if failed is not None else summary)
    return failed if failed is not None else summary


def _add_nfe(acc: dict, r: dict) -> None:
    acc["nfe_sum"] += r["nfe_sum"]
    acc["nfe_sumsq"] += r.get("nfe_sumsq", 0)
    for key, pick in (("nfe_min", min), ("nfe_max", max)):
        if r.get(key) is not None:
            acc[key] = r[key] if acc[key] is None else pick(acc[key], r[key])


def _nfe_summary(acc: dict, n: int) -> dict | None:
    """Mean, standard deviation, min and max of per-sample NFE over the run's samples."""
    if not n:
        return None
    mean = acc["nfe_sum"] / n
    var = max(0.0, acc["nfe_sumsq"] / n - mean * mean)
    return {"mean": mean, "std": math.sqrt(var), "min": acc["nfe_min"], "max": acc["nfe_max"]}


def _outcome(store: LatentStore, group: list[int], res) -> tuple[list[dict], dict[int, str]]:
    """A task's result as (summaries of its done shards, {failed shard id: error})."""
    if isinstance(res, ShardGroupFailed):
        return res.results, dict(res.failures)
    if isinstance(res, BaseException):
        # the task failed as a whole (e.g. its model did not load): its shards that are not done failed
        error = f"{type(res).__name__}: {res}"
        if isinstance(res, StoreLockedError) or len(group) == 1:
            return [], {sid: error for sid in group}
        done = {sid for sid in group if (store.shard_record(sid) or {}).get("state") == "done"}
        return [done_summary(store, s) for s in group if s in done], {s: error for s in group if s not in done}
    return (res if isinstance(res, list) else [res]), {}
