"""`pflatents verify STORE`: re-read every done shard (checksum, finiteness); re-queue bad ones for resume.

Exit 0 if all done shards verify, 1 if any was bad.
"""

from __future__ import annotations

import argparse
import json

from pflatents.flows.cli.common import EXIT_FAILED, EXIT_OK

__all__ = ["register", "cmd_verify"]


def register(sub) -> None:
    """Add the ``verify`` subcommand."""
    v = sub.add_parser("verify", help="re-read every done shard (checksum, finiteness); re-queue bad ones for resume")
    v.add_argument("store")
    v.add_argument("--check-only", action="store_true",
                   help="report only: do not mark bad shards (and do not take the store lock)")
    v.add_argument("--workers", type=int, default=8, help="shards read concurrently (default 8)")
    v.add_argument("--json", action="store_true", help="print the summary as JSON")
    v.set_defaults(func=cmd_verify)


def cmd_verify(a: argparse.Namespace) -> int:
    from pflatents.flows.verify import verify_store

    result = verify_store(a.store, check_only=a.check_only, workers=a.workers)
    if a.json:
        print(json.dumps(result, indent=2))
    else:
        _print(result, marked=not a.check_only)
    return EXIT_FAILED if result["corrupt"] else EXIT_OK


def _print(result: dict, marked: bool) -> None:
    url, bad = result["url"], result["corrupt"]
    print(f"verified {result['checked']} done shard(s) of {url}: {result['ok']} ok, {len(bad)} corrupt"
          + (f" ({result['not_done']} shard(s) not done, not checked)" if result["not_done"] else ""))
    for b in bad:
        print(f"  shard {b['id']}: {b['error']}")
    if bad:
        what = "marked corrupt; run" if marked else "run `pflatents verify` without --check-only, then"
        print(f"{what} `pflatents resume {url}` to re-encode them")
