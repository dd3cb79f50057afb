"""`pflatents extract`, `resume` and `status`: parse the flags, run the job, print one summary line."""

from __future__ import annotations

import argparse
import json
import sys

from pflatents.flows.cli.common import (EXIT_FAILED, EXIT_OK, add_model_args, add_run_args, model_values, run_settings,
                                        store_url)

__all__ = ["register", "job_from_args", "cmd_extract", "cmd_resume", "cmd_status"]


def register(sub) -> None:
    """Add the ``extract``, ``resume`` and ``status`` subcommands."""
    from pflatents.tasks.config import JobSettings

    e = sub.add_parser("extract", help="encode a dataset into a Zarr store of latents")
    add_model_args(e, JobSettings)
    add_run_args(e)
    e.set_defaults(func=cmd_extract)

    r = sub.add_parser("resume", help="finish every shard of a store that is not done, with its pinned config")
    r.add_argument("store")
    add_run_args(r)
    r.set_defaults(func=cmd_resume)

    s = sub.add_parser("status", help="shard counts, failed shards and the config summary of a store")
    s.add_argument("store")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_status)


def job_from_args(a: argparse.Namespace):
    """The extraction job named by `extract` flags (defaults from JobSettings)."""
    from pflatents.flows.coordinator import Job

    return Job.from_dict(model_values(a, Job))


def _finish(outcome, as_json: bool = False) -> int:
    if as_json:
        print(json.dumps({"ok": outcome.ok, "store": outcome.url, "message": outcome.message, **outcome.summary},
                         indent=2, default=str))
    if not outcome.ok:
        print(f"pflatents: extraction incomplete: {outcome.message}", file=sys.stderr)
        return EXIT_FAILED
    if not as_json:
        print(outcome.message)
    return EXIT_OK


def _say(a: argparse.Namespace):
    """Notes go to stdout, or to stderr when stdout holds the JSON outcome."""
    return (lambda msg: print(msg, file=sys.stderr)) if a.json else print


def cmd_extract(a: argparse.Namespace) -> int:
    from pflatents.flows.run import extract_job

    return _finish(extract_job(job_from_args(a), run_settings(a), say=_say(a), progress=not a.no_progress), a.json)


def cmd_resume(a: argparse.Namespace) -> int:
    from pflatents.flows.run import resume_store

    return _finish(resume_store(a.store, run_settings(a), say=_say(a), progress=not a.no_progress), a.json)


def cmd_status(a: argparse.Namespace) -> int:
    from pflatents.storage import LatentStore

    url = store_url(a.store)
    st = LatentStore.open(url, mode="r").status()
    if a.json:
        print(json.dumps(st, indent=2, default=str))
        return EXIT_OK
    print(f"store    {url}")
    print(f"shards   {st['n_shards']}: {st['done']} done, {st['failed']} failed, {st['pending']} pending")
    if st.get("incremental"):
        print(f"samples  {st['n_samples']} published, {st['n_planned']} planned (incremental store)")
    for f in st.get("failed_shards", []):
        print(f"  failed shard {f['id']}: {f['error']}")
    if st.get("samples_failed"):
        print(f"flagged  {st['samples_failed']} samples the solver could not finish (NaN latents) in shards "
              f"{st['shards_with_failed_samples']}; `pflatents resume --retry-samples {url}` retries them")
    cfg = st.get("config", {})
    if cfg:
        pilot = cfg.get("pilot")
        shown = {**cfg, "pilot": {k: v for k, v in pilot.items() if k not in ("curve", "candidates")}} if pilot else cfg
        print(f"config   {json.dumps(shown, default=str)}")
    if cfg.get("pilot"):
        from pflatents.tasks.ode.pilot import curve_table, describe

        print(f"pilot    {describe(cfg['pilot'])}")
        for line in curve_table(cfg["pilot"]):
            print(f"  {line}")
    return EXIT_OK
