"""`pflatents serve`: a scheduled, incremental extraction deployment served against a Prefect server.

Each scheduled run (the ``extract-scheduled`` flow, run by the Prefect runner in its own process) does
what `pflatents extract --incremental` does: validate, take the store lock, check the extracted prefix,
grow the store for new samples, run the extract flow over the pending shards (earlier failures first,
then the new ones) and publish the new count. A run with nothing new ends COMPLETED at once; a run with
failed shards ends FAILED with their ids in its state message.

The job comes from flags or a TOML/YAML file (flat keys, or tables ``[job]``, ``[schedule]``,
``[run]``); flags override the file::

    data = "npydir:/data/incoming"     # job: the `extract` options (t_eps, shard_size, ...)
    model = "gmm:/models/gmm.json"
    out = "s3://bucket/latents.zarr"
    solver = "rk4"
    steps = 20
    interval = 3600                    # schedule: seconds, or cron = "0 * * * *"
    runner = "dask://10.0.0.5:8786"    # run: runner, workers, device, retries
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

__all__ = ["register", "cmd_serve", "scheduled_extract", "run_scheduled"]

JOB_FLAGS = ("data", "model", "out", "sde", "t_eps", "solver", "rtol", "atol", "steps", "grid", "shard_size",
             "batch_size", "dtype")
RUN_KEYS = ("runner", "workers", "device", "retries")
SCHEDULE_KEYS = ("interval", "cron", "name")
NO_SERVER = """scheduled runs need a Prefect server, and PREFECT_API_URL is not set. Start one and point at it:
    prefect server start --host 127.0.0.1 --port 4200
    export PREFECT_API_URL=http://127.0.0.1:4200/api"""


def register(sub) -> dict:
    s = sub.add_parser("serve", help="serve a scheduled, incremental extraction on the Prefect server at PREFECT_API_URL")
    s.add_argument("--config", help="TOML or YAML file with the job, schedule and run settings (flags override it)")
    s.add_argument("--data", help="file.npy | npydir:DIR | store.zarr[/array] | images:DIR | sklearn:digits")
    s.add_argument("--model", help="gmm:params.json | checkpoint dir | diffusers:DIR")
    s.add_argument("--out", help="output store (path or fsspec URL, e.g. s3://bucket/x.zarr)")
    s.add_argument("--sde", choices=["vp", "ve", "edm"])
    s.add_argument("--t-eps", type=float)
    s.add_argument("--solver")
    s.add_argument("--rtol", type=float)
    s.add_argument("--atol", type=float)
    s.add_argument("--steps", type=int)
    s.add_argument("--grid")
    s.add_argument("--shard-size", type=int)
    s.add_argument("--batch-size", type=int)
    s.add_argument("--dtype", choices=["float32", "float64"])
    s.add_argument("--interval", type=float, help="seconds between scheduled runs")
    s.add_argument("--cron", help="cron schedule, e.g. '0 * * * *' (instead of --interval)")
    s.add_argument("--name", help="deployment name (default: pflatents-<store name>)")
    s.add_argument("--runner", help="local | dask | dask://HOST:PORT (default local)")
    s.add_argument("--workers", type=int, help="concurrent shard tasks (default 1)")
    s.add_argument("--device", help="auto | cpu | cuda[:N] (default auto)")
    s.add_argument("--retries", type=int, help="retries per shard within a run (default 2)")
    return {"serve": cmd_serve}


def load_settings(path: str | None) -> dict[str, Any]:
    """Flat settings from a TOML/YAML file (tables job/schedule/run are merged into one level)."""
    from pflatents.tasks.errors import InputError

    if not path:
        return {}
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise InputError(f"cannot read the serve config {p}: {e.strerror or e}") from None
    try:
        if p.suffix in (".yaml", ".yml"):
            import yaml

            raw = yaml.safe_load(text) or {}
        else:
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib

            raw = tomllib.loads(text)
    except Exception as e:  # parse errors of either format
        raise InputError(f"cannot parse the serve config {p}: {e}") from None
    if not isinstance(raw, dict):
        raise InputError(f"the serve config {p} must hold a table of settings")
    flat: dict[str, Any] = {}
    for key, value in raw.items():
        if key in ("job", "schedule", "run") and isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    return {str(k).replace("-", "_"): v for k, v in flat.items()}


def _settings(a: argparse.Namespace) -> tuple[dict, dict, dict]:
    """(job, schedule, run) settings: the config file, overridden by flags given."""
    from pflatents.tasks.errors import InputError

    s = load_settings(a.config)
    for key in (*JOB_FLAGS, *RUN_KEYS, *SCHEDULE_KEYS):
        if getattr(a, key, None) is not None:
            s[key] = getattr(a, key)
    schedule = {k: s.pop(k) for k in SCHEDULE_KEYS if k in s}
    run = {"runner": "local", "workers": 1, "device": "auto", "retries": 2,
           **{k: s.pop(k) for k in RUN_KEYS if k in s}}
    s.setdefault("incremental", True)
    if ("interval" in schedule) == ("cron" in schedule):
        raise InputError("give exactly one schedule: --interval SECONDS or --cron EXPR (or in the config file)")
    if "interval" in schedule and not float(schedule["interval"]) > 0:
        raise InputError(f"--interval must be > 0 seconds; got {schedule['interval']}")
    return s, schedule, run


def _api_url() -> str | None:
    from prefect.settings import PREFECT_API_URL

    return os.environ.get("PREFECT_API_URL") or PREFECT_API_URL.value()


def _check_server(url: str) -> None:
    import urllib.request

    from pflatents.tasks.errors import InputError

    try:
        with urllib.request.urlopen(url.rstrip("/") + "/health", timeout=10) as r:
            if r.status == 200:
                return
    except OSError:
        pass
    raise InputError(f"no Prefect server answers at PREFECT_API_URL={url}\n"
                     f"start one: prefect server start --host 127.0.0.1 --port 4200 "
                     f"(then export PREFECT_API_URL=http://127.0.0.1:4200/api)")


def cmd_serve(a: argparse.Namespace) -> int:
    from datetime import timedelta

    from pflatents.flows.cli import _check_run_args
    from pflatents.flows.coordinator import Job, prepare
    from pflatents.tasks.errors import InputError

    url = _api_url()
    if not url:
        print(f"pflatents: error: {NO_SERVER}", file=sys.stderr)
        return 2
    job_d, schedule, run = _settings(a)
    job = Job.from_dict(job_d).resolved()
    _check_run_args(argparse.Namespace(**run))
    prepare(job)  # validate data, model and settings now, not at the first scheduled run
    _check_server(url)
    from prefect.types.entrypoint import EntrypointType

    name = schedule.get("name") or "pflatents-" + Path(job.out.rstrip("/")).name.removesuffix(".zarr")
    when = ({"interval": timedelta(seconds=float(schedule["interval"]))} if "interval" in schedule
            else {"cron": str(schedule["cron"])})
    if "cron" in when:
        from prefect.client.schemas.schedules import CronSchedule

        try:
            CronSchedule(cron=when["cron"])
        except ValueError as e:
            raise InputError(f"invalid cron expression {when['cron']!r}: {e}".splitlines()[0]) from None
    print(f"serving deployment extract-scheduled/{name} ({_describe(when)}) on {url}; "
          f"store {job.out}; stop with Ctrl-C", flush=True)
    _scheduled_flow().serve(name=name, parameters={"job": job.to_dict(), **run}, limit=1,
                            print_starting_message=False, entrypoint_type=EntrypointType.MODULE_PATH, **when)
    return 0


def _describe(when: dict) -> str:
    return f"every {when['interval'].total_seconds():g} s" if "interval" in when else f"cron {when['cron']}"


def run_scheduled(job: dict, runner: str = "local", workers: int = 1, device: str = "auto",
                  retries: int = 2) -> tuple[bool, str, dict]:
    """One scheduled run: lock, grow, extract pending shards, publish. Returns (ok, message, summary)."""
    from pflatents.flows import extract as ex
    from pflatents.flows.coordinator import Job, grow_to_source, locked, make_store, prepare
    from pflatents.tasks.models.registry import resolve_device

    p = prepare(Job.from_dict(job))
    with locked(lambda: make_store(p), p.url, {"command": "serve"}) as store:
        n_before = store.n_samples
        records = store.shard_records()  # shards that ran before and are not done: retried first
        retry = [i for i in store.pending_shards() if i in records]
        grow_to_source(store, p.src) if p.incremental else None
        new = store.n_planned - n_before
        shard_ids = store.pending_shards()
        shard_ids = [i for i in shard_ids if i in retry] + [i for i in shard_ids if i not in retry]
        if not shard_ids:
            store.publish()
            return True, f"nothing new: {p.url} holds all {store.n_samples} samples", {"samples": 0, "new": 0}
        gpu = runner.startswith("dask") and resolve_device(device).type == "cuda"
        flow = ex.extract.with_options(task_runner=ex.make_runner(runner, workers))
        try:
            summary = flow(store_url=p.url, shard_ids=shard_ids, device=device, retries=retries, request_gpu=gpu)
        except ex.ShardsFailed as e:
            return False, str(e), {"new": new, "retried": retry}
        store.publish()
        msg = (f"extracted {summary['samples']} samples ({new} new) in shards {_ids(shard_ids)}"
               f"{f', retried first: {_ids(retry)}' if retry else ''}; {p.url} now holds {store.n_samples} samples "
               f"(was {n_before})")
        return True, msg, {**summary, "new": new, "retried": retry}


def _ids(ids: list[int], limit: int = 20) -> str:
    return str(ids) if len(ids) <= limit else f"[{', '.join(map(str, ids[:limit]))}, ... ({len(ids)} in all)]"


def _flow():
    from prefect import flow
    from prefect.states import Completed, Failed

    @flow(name="extract-scheduled", persist_result=False, log_prints=True)
    def scheduled_extract(job: dict, runner: str = "local", workers: int = 1, device: str = "auto",
                          retries: int = 2):
        """A scheduled incremental extraction; FAILED with the failed shard ids in its message."""
        ok, message, _ = run_scheduled(job, runner=runner, workers=workers, device=device, retries=retries)
        print(message)
        return Completed(message=message) if ok else Failed(message=message)

    return scheduled_extract


_FLOW: list = []


def _scheduled_flow():
    """The ``extract-scheduled`` flow, built on first use (so `pflatents --help` does not import prefect)."""
    if not _FLOW:
        _FLOW.append(_flow())
    return _FLOW[0]


def __getattr__(name: str):
    # the deployment's entrypoint is ``pflatents.flows.serve.scheduled_extract``
    if name == "scheduled_extract":
        return _scheduled_flow()
    raise AttributeError(name)
