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

import os
from pathlib import Path
from typing import Any

__all__ = ["load_settings", "split_settings", "api_url", "check_server", "serve_job", "run_scheduled",
           "scheduled_extract", "NO_SERVER"]

SCHEDULE_KEYS = ("interval", "cron", "name")
NO_SERVER = """scheduled runs need a Prefect server that outlives this command, and PREFECT_API_URL is not set
(with PFLATENTS_SERVER=off no shared local server is used). Either
    unset PFLATENTS_SERVER                       (the shared local server, started on first use), or
    prefect server start --host 127.0.0.1 --port 4200
    export PREFECT_API_URL=http://127.0.0.1:4200/api"""


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


def split_settings(config: str | None, overrides: dict[str, Any]) -> tuple[dict, dict, dict]:
    """(job, schedule, run) settings: the config file, overridden by the ``overrides`` that are not None.

    Run keys are the fields of ``RunSettings`` (validated here), schedule keys ``interval``, ``cron``
    and ``name``; the rest is the job (checked by ``Job.from_dict``), incremental unless it says not."""
    from pflatents.flows.run import RunSettings
    from pflatents.tasks.errors import InputError

    s = load_settings(config)
    s.update({k: v for k, v in overrides.items() if v is not None})
    schedule = {k: s.pop(k) for k in SCHEDULE_KEYS if k in s}
    run = RunSettings.from_dict({k: s.pop(k) for k in RunSettings.model_fields if k in s}).model_dump()
    s.setdefault("incremental", True)
    if ("interval" in schedule) == ("cron" in schedule):
        raise InputError("give exactly one schedule: --interval SECONDS or --cron EXPR (or in the config file)")
    if "interval" in schedule and not float(schedule["interval"]) > 0:
        raise InputError(f"--interval must be > 0 seconds; got {schedule['interval']}")
    return s, schedule, run


def api_url() -> str | None:
    from prefect.settings import PREFECT_API_URL

    return os.environ.get("PREFECT_API_URL") or PREFECT_API_URL.value()


def check_server(url: str) -> None:
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


def serve_job(job, schedule: dict, run: dict, url: str) -> None:
    """Validate the job now (not at the first scheduled run), then serve its deployment until interrupted."""
    from datetime import timedelta

    from prefect.types.entrypoint import EntrypointType

    from pflatents.flows.coordinator import prepare
    from pflatents.flows.run import RunSettings
    from pflatents.tasks.errors import InputError

    RunSettings.from_dict(run).check()
    prepare(job)
    check_server(url)
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
    _scheduled_flow().serve(name=name, parameters={"job": job.to_dict(), "run": run}, limit=1,
                            print_starting_message=False, entrypoint_type=EntrypointType.MODULE_PATH, **when)


def _describe(when: dict) -> str:
    return f"every {when['interval'].total_seconds():g} s" if "interval" in when else f"cron {when['cron']}"


def run_scheduled(job: dict, run: dict | None = None) -> tuple[bool, str, dict]:
    """One scheduled run: lock, grow, extract pending shards, publish. Returns (ok, message, summary).

    ``job`` and ``run`` are the plain forms of the job and run settings (any field of each)."""
    from pflatents.flows.coordinator import Job
    from pflatents.flows.run import RunSettings, extract_job

    out = extract_job(Job.from_dict(job), RunSettings.from_dict(run or {}), command="serve")
    s = out.summary
    if not out.ok or not s.get("samples"):
        return out.ok, out.message, s
    retry = s["retried"]
    msg = (f"extracted {s['samples']} samples ({s['new']} new) in shards {_ids(s['shard_ids'])}"
           f"{f', retried first: {_ids(retry)}' if retry else ''}; {out.url} now holds {s['n_samples']} samples "
           f"(was {s['n_before']})")
    return True, msg, s


def _ids(ids: list[int], limit: int = 20) -> str:
    return str(ids) if len(ids) <= limit else f"[{', '.join(map(str, ids[:limit]))}, ... ({len(ids)} in all)]"


def _flow():
    from prefect import flow
    from prefect.states import Completed, Failed

    @flow(name="extract-scheduled", persist_result=False, log_prints=True)
    def scheduled_extract(job: dict, run: dict | None = None):
        """A scheduled incremental extraction; FAILED with the failed shard ids in its message."""
        ok, message, _ = run_scheduled(job, run)
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
