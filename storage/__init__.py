"""pflatents storage: the Zarr v3 latent store (layout, config pinning, shard records, lock)."""

from pflatents.storage.config import config_diff, to_json
from pflatents.storage.errors import (
    ConfigMismatchError,
    NotAStoreError,
    ShardVerifyError,
    StoreError,
    StoreLockedError,
)
from pflatents.storage.lock import StoreLock
from pflatents.storage.store import (
    FORMAT_VERSION,
    LatentStore,
    checksum,
    config_hash,
    default_shard_size,
    dimension_names,
    open_or_create,
    plan_shards,
    store_lock,
)

__all__ = [
    "FORMAT_VERSION",
    "ConfigMismatchError",
    "LatentStore",
    "NotAStoreError",
    "ShardVerifyError",
    "StoreError",
    "StoreLock",
    "StoreLockedError",
    "checksum",
    "config_diff",
    "config_hash",
    "default_shard_size",
    "dimension_names",
    "open_or_create",
    "plan_shards",
    "store_lock",
    "to_json",
]
