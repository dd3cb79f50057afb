"""Light helpers for test_storage that spawned processes import (numpy and storage only)."""

from __future__ import annotations

import numpy as np

from pflatents.storage import LatentStore


def shard_data(store: LatentStore, shard_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic latents and NFE for one shard."""
    i0, i1 = store.shard_range(shard_id)
    rng = np.random.default_rng(shard_id)
    return rng.normal(size=(i1 - i0, *store.sample_shape)), rng.integers(10, 99, size=i1 - i0)


def write_shards(url: str, ids: list[int]) -> list[int]:
    """Open the store in this process and write the given shards."""
    store = LatentStore.open(url)
    for i in ids:
        store.write_shard(i, *shard_data(store, i), {"device": "cpu"})
    return ids


def hold_lock(url: str, ready, release) -> None:
    """Hold the store lock until told to release it."""
    store = LatentStore.open(url)
    with store.locked({"cmd": "extract"}):
        ready.set()
        release.wait(30)


def race_lock(url: str, barrier, rounds: int, results) -> None:
    """Each round: all processes try the lock at once; the winner holds it until all have tried."""
    from pflatents.storage import StoreLockedError, store_lock

    for r in range(rounds):
        lock = store_lock(url)
        barrier.wait()
        try:
            lock.acquire({"round": r})
            won = True
        except StoreLockedError:
            won = False
        results.put((r, won))
        barrier.wait()
        if won:
            lock.release()
