"""`pflatents serve`: serve a scheduled, incremental extraction on the Prefect server at PREFECT_API_URL.

The job comes from flags or a TOML/YAML file (see ``pflatents.flows.serve``); flags override the file.
"""

from __future__ import annotations

import argparse
import sys

from pflatents.flows.cli.common import EXIT_OK, EXIT_USAGE

__all__ = ["register", "cmd_serve"]

JOB_FLAGS = ("data", "model", "out", "sde", "t_eps", "solver", "rtol", "atol", "steps", "grid", "shard_size",
             "batch_size", "dtype")
OTHER_FLAGS = ("runner", "workers", "device", "retries", "interval", "cron", "name")


def register(sub) -> None:
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
    s.set_defaults(func=cmd_serve)


def cmd_serve(a: argparse.Namespace) -> int:
    from pflatents.flows.coordinator import Job
    from pflatents.flows.serve import NO_SERVER, api_url, serve_job, split_settings

    url = api_url()
    if not url:
        print(f"pflatents: error: {NO_SERVER}", file=sys.stderr)
        return EXIT_USAGE
    job_d, schedule, run = split_settings(a.config, {k: getattr(a, k) for k in (*JOB_FLAGS, *OTHER_FLAGS)})
    serve_job(Job.from_dict(job_d).resolved(), schedule, run, url)
    return EXIT_OK
