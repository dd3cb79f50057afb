"""`pflatents extract`, `resume` and `status`: parse the flags, run the job, print one summary line."""

from __future__ import annotations

import argparse
import json
import sys

from pflatents.flows.cli.common import EXIT_FAILED, EXIT_OK, add_run_args, run_settings, store_url

__all__ = ["register", "job_from_args", "cmd_extract", "cmd_resume", "cmd_status"]


def register(sub) -> None:
    """Add the ``extract``, ``resume`` and ``status`` subcommands."""
    e = sub.add_parser("extract", help="encode a dataset into a Zarr store of latents")
    e.add_argument("--data", required=True, help="file.npy | store.zarr[/array] | images:DIR | sklearn:digits")
    e.add_argument("--model", required=True, help="gmm:params.json | checkpoint dir | diffusers:DIR")
    e.add_argument("--out", required=True, help="output store (path or fsspec URL)")
    e.add_argument("--sde", default="vp", choices=["vp", "ve", "edm"])
    e.add_argument("--t-eps", type=float, default=1e-5)
    e.add_argument("--solver", default="dopri5", help="dopri5 | rk4 | heun | euler | dpmpp2m")
    e.add_argument("--rtol", type=float, default=5e-7, help="dopri5 relative tolerance (5e-7 keeps the worst latent error under 1e-4, README)")
    e.add_argument("--atol", type=float, default=5e-7)
    e.add_argument("--steps", type=int, default=50, help="steps of a fixed-step solver")
    e.add_argument("--grid", default="logsnr", help="time grid of fixed-step solvers: logsnr | edm | time")
    e.add_argument("--shard-size", type=int, default=None, help="samples per shard (default: chunks of ~8 MiB)")
    e.add_argument("--batch-size", type=int, default=1024)
    e.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    e.add_argument("--incremental", action="store_true",
                   help="the data may grow: extract only samples new since the last run into the same store "
                        "(always on for npydir:DIR)")
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
    """The extraction job named by `extract` flags."""
    from pflatents.flows.coordinator import Job

    return Job(data=a.data, model=a.model, out=a.out, sde=a.sde, t_eps=a.t_eps, solver=a.solver, rtol=a.rtol,
               atol=a.atol, steps=a.steps, grid=a.grid, shard_size=a.shard_size, batch_size=a.batch_size,
               dtype=a.dtype, incremental=getattr(a, "incremental", False))


def _finish(outcome) -> int:
    if not outcome.ok:
        print(f"pflatents: extraction incomplete: {outcome.message}", file=sys.stderr)
        return EXIT_FAILED
    print(outcome.message)
    return EXIT_OK


def cmd_extract(a: argparse.Namespace) -> int:
    from pflatents.flows.run import extract_job

    return _finish(extract_job(job_from_args(a), run_settings(a), say=print, progress=not a.no_progress))


def cmd_resume(a: argparse.Namespace) -> int:
    from pflatents.flows.run import resume_store

    return _finish(resume_store(a.store, run_settings(a), say=print, progress=not a.no_progress))


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
    cfg = st.get("config", {})
    if cfg:
        print(f"config   {json.dumps(cfg, default=str)}")
    return EXIT_OK
