"""`pflatents server start|stop|status`: the shared local Prefect server that commands use by themselves.

Every command that runs a flow starts it on first use when ``PREFECT_API_URL`` is unset (see
``pflatents.flows.server``); ``start`` starts it ahead (optionally with Prefect's dashboard), ``stop``
stops it, ``status`` says where it is and how long it stays.
"""

from __future__ import annotations

import argparse
import json
import os

from pflatents.flows.cli.common import EXIT_FAILED, EXIT_OK

__all__ = ["register", "cmd_server"]


def register(sub) -> None:
    """Add the ``server`` subcommand with its actions start, stop and status."""
    p = sub.add_parser("server", help="start, stop or show the shared local Prefect server (commands start it "
                                      "on first use)")
    actions = p.add_subparsers(dest="action", required=True)
    start = actions.add_parser("start", help="start the shared local Prefect server in the background on a free "
                                             "loopback port")
    start.add_argument("--port", type=int, default=None, help="port on 127.0.0.1 (default: a free one)")
    start.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for it to answer (default 180)")
    start.add_argument("--ui", action="store_true", help="also serve Prefect's dashboard (it talks to this server)")
    start.add_argument("--idle", type=float, default=0.0, metavar="SECONDS",
                       help="stop after this many seconds without a command using it (default 0: run until "
                            "`pflatents server stop`; a server a command started stops after PFLATENTS_SERVER_IDLE, "
                            "default 1800)")
    actions.add_parser("stop", help="stop the shared local Prefect server")
    status = actions.add_parser("status", help="is the shared local Prefect server running, where, and for how long")
    status.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_server)


def _idle_line(st: dict) -> str:
    if st.get("in_use_by"):
        return f"in use by {st['in_use_by']} command(s)"
    if st.get("idle_left_s") is not None:
        return f"stops in {st['idle_left_s']:.0f} s unless a command uses it (idle limit {st['idle']:g} s)"
    return "stops only with `pflatents server stop`"


def cmd_server(a: argparse.Namespace) -> int:
    from pflatents.flows import server
    from pflatents.tasks.errors import InputError

    if a.action == "start":
        if a.idle < 0:
            raise InputError(f"--idle takes seconds >= 0 (0: run until `pflatents server stop`); got {a.idle:g}")
        st = server.start_server(port=a.port, timeout=a.timeout, ui=a.ui, idle=a.idle)
        what = "started" if st["started_now"] else "already running"
        print(f"Prefect server {what}: {st['url']} (pid {st['pid']}, log {st['log']})")
        if st.get("dashboard"):
            print(f"dashboard: {st['dashboard']}")
        print(f"pflatents commands use it while PREFECT_API_URL is unset; it {_idle_line(st)}")
        if os.environ.get("PREFECT_API_URL") and os.environ["PREFECT_API_URL"] != st["url"]:
            print(f"note: PREFECT_API_URL is set ({os.environ['PREFECT_API_URL']}): commands in this shell report "
                  f"there, not to this server")
        return EXIT_OK
    if a.action == "stop":
        st = server.stop_server()
        if st is None:
            print(f"no local Prefect server recorded under {server.prefect_home()}")
        elif st["was_running"]:
            print(f"stopped the Prefect server at {st['url']} (pid {st['pid']})")
        else:
            print(f"the Prefect server recorded at {st['url']} (pid {st['pid']}) was not running; record removed")
        return EXIT_OK
    st = server.server_status()
    if a.json:
        print(json.dumps(st, indent=2))
    elif st["running"]:
        print(f"running: {st['url']} (pid {st['pid']}, port {st['port']}, since {st['started']})")
        print(f"database: {st.get('database')}")
        print(f"log: {st['log']}")
        print(f"idle: {_idle_line(st)}")
        print(f"dashboard: {st['dashboard']}" if st.get("dashboard")
              else "dashboard: off (`pflatents server stop`, then `pflatents server start --ui`)")
    else:
        print(f"not running (state {st['state']}); commands start it when they need it, or `pflatents server start`")
    return EXIT_OK if st["running"] else EXIT_FAILED
