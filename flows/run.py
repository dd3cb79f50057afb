"""Run an extraction job end to end: the one code path of `extract`, `resume`, scheduled runs and the API.

``extract_job`` validates a job (before any lock or Prefect), ``resume_store`` checks that a store's
data and model are unchanged; both then call ``run_pending``: take the store's lock, open or create
the store, grow it for new samples (incremental), run the extract flow over the pending shards
(shards that ran before and are not done first, then new ones), and publish the new sample count.
Nothing here prints: callers pass ``say`` for progress lines and get an ``Outcome`` back.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

from pydantic import BaseModel, ConfigDict, Field, ValidationError

__all__ = ["RunSettings", "Outcome", "extract_job", "resume_store", "run_pending"]


class RunSettings(BaseModel):
    """How to run (never pinned: none of these decide the latents). Fields become run flags and the
    ``[run]`` keys of serve job files, the way ``JobSettings`` fields do."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    runner: str = Field("local", description="local | dask | dask://HOST:PORT")
    workers: int = Field(1, ge=1, description="concurrent shard tasks (threads or LocalCluster workers)")
    device: str = Field("auto", description="auto | cpu | cuda[:N]")
    retries: int = Field(2, ge=0, description="retries per task on errors that can change on retry (a retry "
                         "redoes only the task's shards not done)")
    shards_per_task: int | None = Field(None, ge=1, description="shards (store chunks) one task covers; default: "
                                        "enough shards for 8 batches while leaving 4 tasks per worker, and at "
                                        "most 4096 tasks per run. Records, retries and resume stay per shard")
    retry_samples: bool = Field(False, description="also re-integrate the samples flagged step_limit or "
                                "nonfinite in done shards, with 10x the step limit and 10x tighter tolerances "
                                "(fixed-step solvers: 4x the steps), in float64")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunSettings":
        """Build from plain keys; bad values are an InputError naming the setting and the value."""
        from pflatents.tasks.config import validation_message
        from pflatents.tasks.errors import InputError

        try:
            return cls(**{str(k).replace("-", "_"): v for k, v in d.items()})
        except ValidationError as e:
            raise InputError(validation_message(e)) from None

    def check(self) -> "RunSettings":
        """Refuse an unknown runner or a device this machine does not have."""
        from pflatents.tasks.errors import InputError
        from pflatents.tasks.models.registry import resolve_device

        if not (self.runner in ("local", "dask") or self.runner.startswith("dask://")):
            raise InputError(f"unknown runner {self.runner!r}; use local, dask or dask://HOST:PORT")
        resolve_device(self.device)
        return self


@dataclass
class Outcome:
    """What a run did: ``ok`` (no shard failed), a one-line ``message`` and the flow's ``summary``."""

    ok: bool
    message: str
    url: str
    summary: dict[str, Any] = field(default_factory=dict)


def _quiet(_: str) -> None:
    pass


def extract_job(job, run: RunSettings, *, command: str = "extract", say: Callable[[str], None] = _quiet,
                progress: bool = False) -> Outcome:
    """Validate ``job`` (a ``Job``) and run it; an incremental job first grows the store for new samples."""
    from pflatents.flows.coordinator import grow_to_source, make_store, prepare

    p = prepare(job)
    skipped = (p.cfg.data.options or {}).get("skipped") or []
    if skipped:
        listed = "; ".join(f"{sid} ({why})" for sid, why in skipped[:20])
        say(f"skipped {len(skipped)} unreadable image(s) (--skip-bad; all listed in the store's config, "
            f"data.options.skipped): {listed}{' ...' if len(skipped) > 20 else ''}")
    if p.cfg.pilot is not None:
        from pflatents.tasks.ode.pilot import describe, pending

        if not pending(p.cfg.pilot):  # a pending pilot runs as the flow's first step and is described then
            say(describe(p.cfg.pilot))
    run.check()
    grow = (lambda store: grow_to_source(store, p.src)) if p.incremental else None
    return run_pending(lambda: make_store(p), p.url, run, command=command, grow=grow, say=say, progress=progress)


def resume_store(store: str, run: RunSettings, *, say: Callable[[str], None] = _quiet,
                 progress: bool = False) -> Outcome:
    """Finish every shard of ``store`` that is not done, with its pinned config.

    Refused when the data's fingerprint or the model's content hash changed since the store was made."""
    from pflatents.flows.coordinator import check_source, store_url, upgraded
    from pflatents.storage import LatentStore
    from pflatents.tasks.config import ExtractConfig
    from pflatents.tasks.data.sources import open_pinned
    from pflatents.tasks.errors import InputError
    from pflatents.tasks.models.registry import model_info

    url = store_url(store)
    existing = LatentStore.open(url)
    cfg = ExtractConfig.from_store(existing)
    check_source(existing, cfg, open_pinned(cfg.data))
    info = model_info(cfg.model.spec, cfg.make_sde())
    if info.content_hash != cfg.model.content_hash:
        raise InputError(f"the model {cfg.model.spec} changed since the store was created (content hash "
                         f"{info.content_hash[:12]} != pinned {cfg.model.content_hash[:12]}); refusing to resume {url}")
    run.check()
    return run_pending(lambda: upgraded(LatentStore.open(url)), url, run, command="resume", say=say,
                       progress=progress)


def run_pending(open_store: Callable[[], Any], url: str, run: RunSettings, *, command: str,
                grow: Callable[[Any], int] | None = None, say: Callable[[str], None] = _quiet,
                progress: bool = False) -> Outcome:
    """Under the store's lock: grow (optional), extract the pending shards, publish.

    ``summary`` holds the extract flow's figures (``samples``, ``seconds``, ``samples_per_s``,
    ``mean_nfe``) and ``new`` (planned samples not yet published before this run), ``grown`` (samples
    this run's growth added), ``retried`` (shards that had run before),
    ``shard_ids`` (in the order run), ``n_before`` and ``n_samples`` (published counts).
    """
    from pflatents.flows.coordinator import locked
    from pflatents.flows.server import prefect_env, resume_gc, use_server

    with locked(open_store, url, {"command": command}) as store:
        n_before = store.n_samples
        records = store.shard_records()
        retry = [i for i in store.pending_shards() if i in records]
        grown = grow(store) if grow is not None else 0
        pending = store.pending_shards()
        pending = [i for i in pending if i in retry] + [i for i in pending if i not in retry]
        base = {"new": store.n_planned - n_before, "grown": grown, "retried": retry, "shard_ids": pending,
                "n_before": n_before}
        flagged = store.shards_with_failed_samples(records) if run.retry_samples else []
        if not pending and not flagged:
            store.publish()
            if store.incremental:
                msg = f"nothing new: {url} holds all {store.n_samples} samples of the data"
            else:
                msg = f"nothing to do: all {store.n_shards} shards of {url} are done"
            return Outcome(True, msg, url, {**base, "samples": 0, "n_samples": store.n_samples})
        if grown:
            say(f"{grown} new samples: store grows to {store.n_planned} samples")
        from pflatents.flows.coordinator import bitwise_caveats

        for line in bitwise_caveats(store, run.device):
            say(f"note: {line}")
        prefect_env()
        api_url = use_server()
        from pflatents.flows import extract as ex
        from pflatents.flows import progress as prog
        from pflatents.tasks.models.registry import resolve_device

        from prefect import tags

        from pflatents.flows import dashboard

        gpu = run.runner.startswith("dask") and resolve_device(run.device).type == "cuda"
        n_pending = sum(stop - start for start, stop in (store.shard_range(i) for i in pending))
        n_run = n_pending
        n_pending += sum(int(records[i]["samples_failed"]) for i in flagged)
        name = dashboard.job_run_name(command, url, n_run, len(pending))
        t0 = time.perf_counter()
        from pflatents.tasks.ode.pilot import pending as pilot_pending
        from pflatents.tasks.wrappers import pilot as pilot_task

        pilot = store.config.get("pilot")
        pilot_row = (pilot_task.run_name(pilot["target"]),) if pilot_pending(pilot) else ()
        with prog.bar(n_pending, "encoding", disabled=not progress, rows=tuple((r, 1) for r in pilot_row)) as update, \
                dashboard.ServerWatch(api_url, url, command) as watch:
            hook = lambda n, info: update(advance=n)  # noqa: E731
            prog.hooks.append(hook)
            pilot_hook = None
            if pilot_row:
                pilot_hook = lambda done, total, what: update.rows[pilot_row[0]](completed=done, total=total)  # noqa: E731
                pilot_task.hooks.append(pilot_hook)
            try:
                flow = ex.extract.with_options(task_runner=ex.make_runner(run.runner, run.workers),
                                               flow_run_name=name)
                k = ex.shards_per_task(len(pending), store.shard_size, int(store.config["batch_size"]),
                                       run.workers, run.shards_per_task)
                resume_gc()  # the start-up is over (pause_gc)
                with tags(*dashboard.run_tags(url, store.config["model"].get("kind"))):
                    summary = flow(store_url=url, shard_ids=pending, device=run.device, retries=run.retries,
                                   request_gpu=gpu, retry_samples=run.retry_samples, shards_per_task=k)
            except ex.ShardsFailed as e:
                _say_pilot(url, pilot_row, say)
                return Outcome(False, str(e) + watch.dropped_note(), url, base)
            except Exception as e:
                if not (watch.lost.is_set() or dashboard.is_server_error(e)):
                    raise
                dashboard.show_traceback()
                summary = _without_server(store, pending, watch, time.perf_counter() - t0)
                if isinstance(summary, str):
                    return Outcome(False, summary, url, base)
            finally:
                prog.hooks.remove(hook)
                if pilot_hook is not None:
                    pilot_task.hooks.remove(pilot_hook)
        _say_pilot(url, pilot_row, say)
        store.publish()
        n_samples = store.n_samples
    msg = (f"done: {summary['samples']} samples in {summary['seconds']:.1f} s "
           f"({summary['samples_per_s']:.0f} samples/s), mean NFE {summary['mean_nfe']:.1f} -> {url}")
    if watch.lost.is_set():
        msg += (f"\nevery shard is done in the store, although the Prefect server went away during the run"
                f"{watch.dropped_note()}")
    if summary.get("samples_failed"):
        msg += (f"\n{summary['samples_failed']} sample(s) could not be integrated (step limit or non-finite): "
                f"stored flagged with NaN latents; `pflatents resume --retry-samples {url}` retries them")
    return Outcome(True, msg, url, {**summary, **base, "n_samples": n_samples})


def _say_pilot(url: str, pilot_row: tuple, say: Callable[[str], None]) -> None:
    """After a run that started with a pending pilot: say what the pilot chose (read from the store)."""
    if not pilot_row:
        return
    from pflatents.storage import LatentStore
    from pflatents.tasks.ode.pilot import describe, pending

    rec = LatentStore.open(url, mode="r").config.get("pilot")
    if rec and not pending(rec):
        say(describe(rec))


def _without_server(store, pending: list[int], watch, seconds: float) -> dict[str, Any] | str:
    """After the flow call failed on an unreachable Prefect server, the store decides: the summary of a
    finished run, or (a string) what is not done and the command that finishes it."""
    from pflatents.flows import dashboard
    from pflatents.flows.extract import ShardsFailed
    from pflatents.storage.layout import shard_label

    url = store.url
    result = dashboard.results.pop(url, None)
    what = ("went away during the run" if watch.lost.is_set() else "did not answer")
    if isinstance(result, ShardsFailed):
        return f"{result}{watch.dropped_note()}"
    records = store.shard_records()
    left = [i for i in pending if (records.get(i) or {}).get("state") != "done"]
    if left:
        kept = "the others are safe in the store" if len(left) < len(pending) else "nothing was encoded"
        return (f"the Prefect server at {watch.api_url} {what}; {len(left)} of {len(pending)} shard(s) are not "
                f"done ({shard_label(left)}), {kept}. Run `pflatents resume {url}` to finish them"
                f"{watch.dropped_note()}")
    if isinstance(result, dict):
        return result
    import numpy as np

    ranges = [store.shard_range(i) for i in pending]
    n = sum(b - a for a, b in ranges)
    nfe = sum(int(np.asarray(store.nfe_array()[a:b], dtype=np.int64).sum()) for a, b in ranges)
    return {"shards": len(pending), "failed_shards": [], "samples": n, "seconds": seconds,
            "samples_per_s": n / seconds if seconds > 0 else 0.0, "mean_nfe": nfe / n if n else 0.0,
            "samples_failed": sum(int((records.get(i) or {}).get("samples_failed") or 0) for i in pending)}
