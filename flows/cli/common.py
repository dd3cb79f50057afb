"""Helpers every command module shares: exit codes, run flags, store URLs, Prefect's environment.

Imports stay light (argparse only at module level): ``pflatents --help`` must not import Prefect,
torch or zarr; heavy imports belong inside the handlers.
"""

from __future__ import annotations

import argparse

from pflatents.flows.server import prefect_env

__all__ = ["EXIT_OK", "EXIT_FAILED", "EXIT_USAGE", "add_run_args", "run_settings", "store_url", "prefect_env"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def add_run_args(p: argparse.ArgumentParser, progress: bool = True) -> None:
    """Flags that say how to run (runner, workers, device, retries), never what is computed."""
    p.add_argument("--runner", default="local", help="local | dask | dask://HOST:PORT (default local)")
    p.add_argument("--workers", type=int, default=1, help="concurrent shard tasks (threads or LocalCluster workers)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N] (default auto)")
    p.add_argument("--retries", type=int, default=2, help="retries per shard on errors (default 2)")
    if progress:
        p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_settings(a: argparse.Namespace):
    """The RunSettings named by the run flags (not yet checked)."""
    from pflatents.flows.run import RunSettings

    return RunSettings(runner=a.runner, workers=a.workers, device=a.device, retries=a.retries)


def store_url(path: str) -> str:
    """A local path made absolute; an fsspec URL (``s3://...``) as given."""
    from pflatents.flows.coordinator import store_url as _url

    return _url(path)
