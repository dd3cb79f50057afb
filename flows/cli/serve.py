"""`pflatents serve`: serve a scheduled, incremental extraction on the Prefect server at PREFECT_API_URL.

The job comes from flags or a TOML/YAML file (see ``pflatents.flows.serve``); flags override the file.
"""

from __future__ import annotations

import argparse
import sys

from pflatents.flows.cli.common import EXIT_OK, EXIT_USAGE, add_model_args

__all__ = ["register", "cmd_serve"]

def register(sub) -> None:
    """Add the ``serve`` subcommand (job and run flags from the settings models)."""
    from pflatents.flows.run import RunSettings
    from pflatents.tasks.config import JobSettings

    s = sub.add_parser("serve", help="serve a scheduled, incremental extraction on the Prefect server at PREFECT_API_URL")
    s.add_argument("--config", help="TOML or YAML file with the job, schedule and run settings (flags override it)")
    add_model_args(s, JobSettings, required=False, skip=("incremental",))
    s.add_argument("--interval", type=float, help="seconds between scheduled runs")
    s.add_argument("--cron", help="cron schedule, e.g. '0 * * * *' (instead of --interval)")
    s.add_argument("--name", help="deployment name (default: pflatents-<store name>)")
    add_model_args(s, RunSettings, required=False)
    s.set_defaults(func=cmd_serve)


def cmd_serve(a: argparse.Namespace) -> int:
    from pflatents.flows.coordinator import Job
    from pflatents.flows.serve import NO_SERVER, api_url, serve_job, split_settings
    from pflatents.flows.server import server_mode, use_server

    url = api_url()
    if not url and server_mode() == "off":
        print(f"pflatents: error: {NO_SERVER}", file=sys.stderr)
        return EXIT_USAGE
    flags = {k: v for k, v in vars(a).items() if k not in ("cmd", "func", "debug", "config")}
    job_d, schedule, run = split_settings(a.config, flags)
    job = Job.from_dict(job_d).resolved()
    url = url or use_server()  # the shared local server, kept up (a lease) while this serves
    serve_job(job, schedule, run, url)
    return EXIT_OK
