"""Verify a store (what `pflatents verify STORE` runs): re-read every done shard, re-queue the bad ones.

Each done shard's latents and NFE chunks are read back and checked for NaN/Inf and against the
checksum in its record. A shard that fails is recorded "corrupt" (with the reason), which is not
done: `pflatents resume STORE` re-encodes it. ``check_only`` reports without marking (and without
taking the store lock).
"""

from __future__ import annotations

__all__ = ["verify_store"]


def verify_store(store: str, check_only: bool = False, workers: int = 8) -> dict:
    """``{"url", "checked", "ok", "corrupt": [{"id", "error"}], "not_done"}`` of the store's done shards."""
    from pflatents.flows.coordinator import locked, store_url
    from pflatents.storage import LatentStore

    url = store_url(store)
    if check_only:
        result = LatentStore.open(url, mode="r").verify(mark=False, workers=workers)
    else:
        with locked(lambda: LatentStore.open(url), url, {"command": "verify"}) as st:
            result = st.verify(mark=True, workers=workers)
    return {"url": url, **result}
