"""`pflatents server start|stop|status`: a managed local Prefect server that every command uses.

With it up and ``PREFECT_API_URL`` unset, commands connect to it instead of starting Prefect's
temporary server each time (see ``pflatents.flows.server``).
"""

from __future__ import annotations

import argparse
import json
import os

from pflatents.flows.cli.common import EXIT_FAILED, EXIT_OK

__all__ = ["register", "cmd_server"]


def register(sub) -> None:
    """Add the ``server`` subcommand with its actions start, stop and status."""
    p = sub.add_parser("server", help="start, stop or show a managed local Prefect server (every command uses it)")
    actions = p.add_subparsers(dest="action", required=True)
    start = actions.add_parser("start", help="start `prefect server start` in the background on a free loopback port")
    start.add_argument("--port", type=int, default=None, help="port on 127.0.0.1 (default: a free one)")
    start.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for it to answer (default 180)")
    start.add_argument("--ui", action="store_true", help="also serve Prefect's web UI")
    actions.add_parser("stop", help="stop the managed server")
    status = actions.add_parser("status", help="is the managed server running, and where")
    status.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_server)


def cmd_server(a: argparse.Namespace) -> int:
    from pflatents.flows import server

    if a.action == "start":
        st = server.start_server(port=a.port, timeout=a.timeout, ui=a.ui)
        what = "started" if st["started_now"] else "already running"
        print(f"Prefect server {what}: {st['url']} (pid {st['pid']}, log {st['log']})")
        print("pflatents commands use it while PREFECT_API_URL is unset; stop it with `pflatents server stop`")
        if os.environ.get("PREFECT_API_URL") and os.environ["PREFECT_API_URL"] != st["url"]:
            print(f"note: PREFECT_API_URL is set ({os.environ['PREFECT_API_URL']}): commands in this shell report "
                  f"there, not to this server")
        return EXIT_OK
    if a.action == "stop":
        st = server.stop_server()
        if st is None:
            print(f"no managed Prefect server recorded under {server.prefect_home()}")
        elif st["was_running"]:
            print(f"stopped the Prefect server at {st['url']} (pid {st['pid']})")
        else:
            print(f"the Prefect server recorded at {st['url']} (pid {st['pid']}) was not running; record removed")
        return EXIT_OK
    st = server.server_status()
    if a.json:
        print(json.dumps(st, indent=2))
    elif st["running"]:
        print(f"running: {st['url']} (pid {st['pid']}, since {st['started']}, log {st['log']})")
    else:
        print(f"not running (state {st['state']}); start it with `pflatents server start`")
    return EXIT_OK if st["running"] else EXIT_FAILED
