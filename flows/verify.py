"""`pflatents verify STORE`: re-read every done shard and re-queue the ones whose data no longer matches.

Each done shard's latents and NFE chunks are read back and checked for NaN/Inf and against the
checksum in its record. A shard that fails is recorded "corrupt" (with the reason), which is not
done: `pflatents resume STORE` re-encodes it. Exit 0 if all done shards verify, 1 if any was bad.
"""

from __future__ import annotations

import argparse
import json

__all__ = ["register", "cmd_verify"]


def register(sub) -> dict:
    v = sub.add_parser("verify", help="re-read every done shard (checksum, finiteness); re-queue bad ones for resume")
    v.add_argument("store")
    v.add_argument("--check-only", action="store_true",
                   help="report only: do not mark bad shards (and do not take the store lock)")
    v.add_argument("--workers", type=int, default=8, help="shards read concurrently (default 8)")
    v.add_argument("--json", action="store_true", help="print the summary as JSON")
    return {"verify": cmd_verify}


def cmd_verify(a: argparse.Namespace) -> int:
    from pflatents.flows.coordinator import locked, store_url
    from pflatents.storage import LatentStore

    url = store_url(a.store)
    if a.check_only:
        result = LatentStore.open(url, mode="r").verify(mark=False, workers=a.workers)
    else:
        with locked(lambda: LatentStore.open(url), url, {"command": "verify"}) as store:
            result = store.verify(mark=True, workers=a.workers)
    if a.json:
        print(json.dumps({"url": url, **result}, indent=2))
    else:
        _print(url, result, marked=not a.check_only)
    return 1 if result["corrupt"] else 0


def _print(url: str, result: dict, marked: bool) -> None:
    bad = result["corrupt"]
    print(f"verified {result['checked']} done shard(s) of {url}: {result['ok']} ok, {len(bad)} corrupt"
          + (f" ({result['not_done']} shard(s) not done, not checked)" if result["not_done"] else ""))
    for b in bad:
        print(f"  shard {b['id']}: {b['error']}")
    if bad:
        what = "marked corrupt; run" if marked else "run `pflatents verify` without --check-only, then"
        print(f"{what} `pflatents resume {url}` to re-encode them")
