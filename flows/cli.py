"""The ``pflatents`` command line: validate inputs before Prefect starts, then run the flows.

User errors (bad input, mismatched store, a locked store) print one or two plain lines on stderr and
exit 2; a job with failed shards exits 1 naming them; ``--debug`` shows tracebacks.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import os
import sys

__all__ = ["main"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _prefect_env() -> None:
    """Quiet, offline-safe Prefect defaults (set before prefect is imported)."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    # OpenMP's spin-waiting threads made 2-thread torch 20-50x slower whenever another process
    # competed for the cores (measured, benchmarks/solvers.py); passive waiting costs nothing alone.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runner", default="local", help="local | dask | dask://HOST:PORT (default local)")
    p.add_argument("--workers", type=int, default=1, help="concurrent shard tasks (threads or LocalCluster workers)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N] (default auto)")
    p.add_argument("--retries", type=int, default=2, help="retries per shard on errors (default 2)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="pflatents", description="Probability-flow ODE latents for whole datasets.")
    ap.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = ap.add_subparsers(dest="cmd", required=True)

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
    _add_run_args(e)

    r = sub.add_parser("resume", help="finish every shard of a store that is not done, with its pinned config")
    r.add_argument("store")
    _add_run_args(r)

    s = sub.add_parser("status", help="shard counts, failed shards and the config summary of a store")
    s.add_argument("store")
    s.add_argument("--json", action="store_true")
    for mod in _plugin_modules():
        COMMANDS.update(mod.register(sub))
    return ap


# Subcommands that live in their own modules: each exposes ``register(subparsers) -> {name: handler}``
# where handler(args) -> exit code. Imports stay light: heavy imports belong inside the handlers.
PLUGINS = ("pflatents.flows.analyze", "pflatents.flows.train", "pflatents.flows.demo", "pflatents.flows.serve", "pflatents.flows.verify")


def _plugin_modules():
    import importlib
    import importlib.util

    for name in PLUGINS:
        if importlib.util.find_spec(name) is not None:
            yield importlib.import_module(name)


def _store_url(out: str) -> str:
    from pflatents.flows.coordinator import store_url

    return store_url(out)


def job_from_args(a: argparse.Namespace):
    """The extraction job named by `extract` flags."""
    from pflatents.flows.coordinator import Job

    return Job(data=a.data, model=a.model, out=a.out, sde=a.sde, t_eps=a.t_eps, solver=a.solver, rtol=a.rtol,
               atol=a.atol, steps=a.steps, grid=a.grid, shard_size=a.shard_size, batch_size=a.batch_size,
               dtype=a.dtype, incremental=getattr(a, "incremental", False))


def cmd_extract(a: argparse.Namespace) -> int:
    from pflatents.flows.coordinator import grow_to_source, make_store, prepare

    p = prepare(job_from_args(a))
    _check_run_args(a)
    grow = (lambda store: grow_to_source(store, p.src)) if p.incremental else None
    return _run(lambda: make_store(p), p.url, a, grow=grow)


def cmd_resume(a: argparse.Namespace) -> int:
    from pflatents.tasks.config import ExtractConfig
    from pflatents.flows.coordinator import check_source
    from pflatents.storage import LatentStore
    from pflatents.tasks.errors import InputError
    from pflatents.tasks.models.registry import model_info
    from pflatents.tasks.data.sources import open_source

    url = _store_url(a.store)
    store = LatentStore.open(url)
    cfg = ExtractConfig.from_dict(store.config)
    src = open_source(cfg.data["spec"])
    check_source(store, cfg, src)
    info = model_info(cfg.model["spec"], cfg.make_sde())
    if info.content_hash != cfg.model["content_hash"]:
        raise InputError(f"the model {cfg.model['spec']} changed since the store was created (content hash "
                         f"{info.content_hash[:12]} != pinned {cfg.model['content_hash'][:12]}); refusing to resume {url}")
    _check_run_args(a)
    return _run(lambda: LatentStore.open(url), url, a)


def _check_run_args(a: argparse.Namespace) -> None:
    from pflatents.tasks.errors import InputError
    from pflatents.tasks.models.registry import resolve_device

    if a.workers < 1:
        raise InputError(f"--workers must be >= 1; got {a.workers}")
    if a.retries < 0:
        raise InputError(f"--retries must be >= 0; got {a.retries}")
    if not (a.runner in ("local", "dask") or a.runner.startswith("dask://")):
        raise InputError(f"unknown runner {a.runner!r}; use local, dask or dask://HOST:PORT")
    resolve_device(a.device)


@contextlib.contextmanager
def _locked(make_store, url: str, owner: dict):
    """Open (or create) the store under its lock (see pflatents.flows.coordinator.locked)."""
    from pflatents.flows.coordinator import locked

    with locked(make_store, url, owner) as store:
        yield store


def _run(make_store, url: str, a: argparse.Namespace, grow=None) -> int:
    """Take the store's lock, grow it for new data (incremental), run the extract flow over pending shards,
    publish the new sample count, print the summary."""
    with _locked(make_store, url, {"command": a.cmd}) as store:
        new = grow(store) if grow is not None else 0
        pending = store.pending_shards()
        if not pending:
            store.publish()
            if store.incremental:
                print(f"nothing new: {url} holds all {store.n_samples} samples of the data")
            else:
                print(f"nothing to do: all {store.n_shards} shards of {url} are done")
            return EXIT_OK
        if new:
            print(f"{new} new samples: store grows to {store.n_planned} samples")
        _prefect_env()
        from pflatents.flows import extract as ex
        from pflatents.flows import progress
        from pflatents.tasks.models.registry import resolve_device

        gpu = a.runner.startswith("dask") and resolve_device(a.device).type == "cuda"
        n_pending = sum(stop - start for start, stop in (store.shard_range(i) for i in pending))
        with _progress(n_pending, disabled=a.no_progress) as hook:
            progress.hooks.append(hook)
            try:
                flow = ex.extract.with_options(task_runner=ex.make_runner(a.runner, a.workers))
                summary = flow(store_url=url, shard_ids=pending, device=a.device, retries=a.retries, request_gpu=gpu)
            except ex.ShardsFailed as e:
                print(f"pflatents: extraction incomplete: {e}", file=sys.stderr)
                return EXIT_FAILED
            finally:
                progress.hooks.remove(hook)
        store.publish()
    print(f"done: {summary['samples']} samples in {summary['seconds']:.1f} s "
          f"({summary['samples_per_s']:.0f} samples/s), mean NFE {summary['mean_nfe']:.1f} -> {url}")
    return EXIT_OK


class _progress:
    """A rich progress bar over samples, fed by the flow's per-shard hook."""

    def __init__(self, total: int, disabled: bool) -> None:
        self.total, self.disabled = total, disabled

    def __enter__(self):
        if self.disabled:
            return lambda n, info: None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.p = Progress(TextColumn("encoding"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                          transient=False)
        self.p.start()
        self.tid = self.p.add_task("encode", total=self.total)
        return lambda n, info: self.p.advance(self.tid, n)

    def __exit__(self, *exc) -> None:
        if not self.disabled:
            self.p.stop()


def cmd_status(a: argparse.Namespace) -> int:
    from pflatents.storage import LatentStore

    st = LatentStore.open(_store_url(a.store), mode="r").status()
    if a.json:
        print(json.dumps(st, indent=2, default=str))
        return EXIT_OK
    print(f"store    {_store_url(a.store)}")
    print(f"shards   {st['n_shards']}: {st['done']} done, {st['failed']} failed, {st['pending']} pending")
    if st.get("incremental"):
        print(f"samples  {st['n_samples']} published, {st['n_planned']} planned (incremental store)")
    for f in st.get("failed_shards", []):
        print(f"  failed shard {f['id']}: {f['error']}")
    cfg = st.get("config", {})
    if cfg:
        print(f"config   {json.dumps(cfg, default=str)}")
    return EXIT_OK


COMMANDS: dict = {"extract": cmd_extract, "resume": cmd_resume, "status": cmd_status}


def main(argv: list[str] | None = None) -> int:
    _prefect_env()
    args = build_parser().parse_args(argv)
    from pflatents.storage.errors import StoreError
    from pflatents.tasks.errors import InputError

    try:
        return COMMANDS[args.cmd](args)
    except (InputError, StoreError) as e:
        if args.debug:
            raise
        print(f"pflatents: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("pflatents: interrupted", file=sys.stderr)
        return 130


def entry() -> None:
    """The console script: ``main()``, then leave without the interpreter's teardown.

    Freeing torch's and Prefect's objects at interpreter exit took ~1 s of every run (measured on a
    tiny extract, README). The handler is registered before anything else imports, so it runs after
    every other atexit handler (Prefect drains its log and event queues there) and after non-daemon
    threads were joined; it then flushes logging and stdio and ends the process with main's exit code.
    """
    code = [1]

    def _leave() -> None:
        import logging

        logging.shutdown()
        for f in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                f.flush()
        os._exit(code[0])

    atexit.register(_leave)
    try:
        code[0] = main()
    except SystemExit as e:  # argparse errors and --help
        code[0] = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        raise
    sys.exit(code[0])


if __name__ == "__main__":
    entry()
