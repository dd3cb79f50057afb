"""pflatents storage: the Zarr v3 latent store (layout, I/O, config pinning, shard records, growth, verify, lock)."""

from pflatents.storage.config import config_diff, to_json
from pflatents.storage.errors import (
    ConfigMismatchError,
    LeaseLostError,
    NotAStoreError,
    ShardVerifyError,
    StoreError,
    StoreLockedError,
)
from pflatents.storage.lock import StoreLock
from pflatents.storage.checksums import checksum
from pflatents.storage.config import config_hash
from pflatents.storage.layout import FORMAT_VERSION, default_shard_size, dimension_names, plan_shards
from pflatents.storage.location import Location
from pflatents.storage.store import LatentStore, open_or_create, store_kind, store_lock

__all__ = [
    "FORMAT_VERSION",
    "ConfigMismatchError",
    "LeaseLostError",
    "LatentStore",
    "Location",
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
    "store_kind",
    "store_lock",
    "to_json",
]
