"""Typed errors for the latent store; messages name the store path, shard or config field."""

from __future__ import annotations

__all__ = [
    "StoreError",
    "NotAStoreError",
    "ConfigMismatchError",
    "StoreLockedError",
    "LeaseLostError",
    "ShardVerifyError",
]


class StoreError(ValueError):
    """A problem with a latent store (bad path, wrong layout, bad shard data)."""


class NotAStoreError(StoreError):
    """The path holds something that is not a (complete) pflatents store."""


class ConfigMismatchError(StoreError):
    """The store was made with a different config; ``differences`` lists (field, stored, new)."""

    def __init__(self, message: str, differences: list[tuple[str, object, object]]) -> None:
        super().__init__(message)
        self.differences = differences


class StoreLockedError(StoreError):
    """Another live process holds the store's lock."""


class LeaseLostError(StoreLockedError):
    """This run no longer holds the store lock it took (lease taken over, expired, or released)."""


class ShardVerifyError(StoreError):
    """A shard's data failed verification (non-finite values or a checksum mismatch)."""
