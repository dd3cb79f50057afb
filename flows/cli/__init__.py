"""The ``pflatents`` command line: validate inputs before Prefect starts, then run the flows.

One module per command (``extract`` holds extract/resume/status); each exposes ``register(subparsers)``,
which adds its subcommands and sets ``func`` (``handler(args) -> exit code``) on them. Command
modules share only ``common`` and never import each other. User errors (bad input, mismatched
store, a locked store) print one or two plain lines on stderr and exit 2; a job with failed shards
exits 1 naming them; ``--debug`` shows tracebacks.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import importlib
import os
import sys

from pflatents.flows.cli.common import EXIT_FAILED, EXIT_OK, EXIT_USAGE, prefect_env

__all__ = ["main", "entry", "build_parser", "COMMAND_MODULES", "EXIT_OK", "EXIT_FAILED", "EXIT_USAGE"]

# The command modules, in the order their subcommands are listed by --help.
COMMAND_MODULES = ("extract", "analyze", "train", "serve", "demo", "verify", "server")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="pflatents", description="Probability-flow ODE latents for whole datasets.")
    ap.add_argument("--debug", action="store_true",
                    help="show tracebacks for errors, and Prefect's run logs on the terminal (any command)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(f"pflatents.flows.cli.{name}").register(sub)
    _debug_everywhere(ap)
    return ap


def _debug_everywhere(parser: argparse.ArgumentParser) -> None:
    """``--debug`` means the same after any subcommand (``pflatents analyze S --debug``) as before it."""
    for action in parser._actions:
        for sub in (getattr(action, "choices", None) or {}).values() if isinstance(action, argparse._SubParsersAction) else ():
            sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                             help="show tracebacks for errors, and Prefect's run logs on the terminal")
            _debug_everywhere(sub)


def main(argv: list[str] | None = None) -> int:
    prefect_env()
    from pflatents.flows import server

    server.pause_gc()  # the command's start-up (imports); resumed as its flow starts, or at once for others
    try:
        return _main(argv)
    finally:
        server.resume_gc()


def _main(argv: list[str] | None) -> int:
    from pflatents.flows import server

    args = build_parser().parse_args(argv)
    if args.cmd not in server.FLOW_COMMANDS:
        server.resume_gc()

    server.note_printers[:] = [lambda msg: print(msg, file=sys.stderr, flush=True)]
    from pflatents.flows import dashboard

    dashboard.quiet[0] = not args.debug
    if args.debug and "prefect" not in sys.modules:
        os.environ["PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL"] = "INFO"  # the run logs' INFO lines too
    from pflatents.storage.errors import StoreError
    from pflatents.tasks.errors import InputError

    try:
        if args.cmd in server.FLOW_COMMANDS:
            server.prestart()  # checks the server settings; PFLATENTS_SERVER=off: starts it while we import
        with _run_logs_off_the_terminal(not args.debug):
            return args.func(args)
    except (InputError, StoreError) as e:
        if args.debug:
            raise
        print(f"pflatents: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except dashboard.ServerGone as e:
        print(f"pflatents: {e}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("pflatents: interrupted", file=sys.stderr)
        return 130


@contextlib.contextmanager
def _run_logs_off_the_terminal(quiet: bool):
    """Without --debug, Prefect's flow- and task-run logs (a failed shard's traceback, for one) go to
    the Prefect API only, not to the terminal: the CLI prints one summary line naming the failed
    shards and what to do. Prefect's logging config sets no ``propagate`` for these two loggers, so
    turning it off here survives Prefect configuring its logging later."""
    import logging

    loggers = [logging.getLogger(n) for n in ("prefect.flow_runs", "prefect.task_runs")] if quiet else []
    before = [lg.propagate for lg in loggers]
    for lg in loggers:
        lg.propagate = False
    try:
        yield
    finally:
        for lg, p in zip(loggers, before):
            lg.propagate = p


def entry() -> None:
    """The console script: ``main()``, then leave without the interpreter's teardown.

    Freeing torch's and Prefect's objects at interpreter exit took ~1 s of every run (measured on a
    tiny extract, benchmarks/README.md). The handler is registered before anything else imports, so
    it runs after every other atexit handler (Prefect drains its log and event queues there) and
    after non-daemon threads were joined; it then flushes logging and stdio and ends the process
    with main's exit code.
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
