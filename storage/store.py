"""The latent store: one Zarr v3 group per extraction, opened or created by ``LatentStore``.

The store's parts live in their own modules: ``layout`` (what is where, building a store),
``location`` (local or fsspec I/O), ``records`` (shard writes and records), ``verify``, ``growth``
(incremental stores), ``lock`` and ``config`` (the pinned config's JSON, hash and diffs).
``LatentStore`` puts them together; this module also holds the entry points ``open_or_create``,
``store_kind`` and ``store_lock``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Literal

import zarr

from pflatents.storage.config import config_diff, config_hash, format_diff, to_json
from pflatents.storage.errors import ConfigMismatchError, NotAStoreError, StoreError
from pflatents.storage.growth import Growth
from pflatents.storage.layout import (
    ATTR,
    FORMAT_VERSION,
    READABLE_VERSIONS,
    MiB,
    build,
    check_layout,
    create_status_array,
    not_a_store_message,
    now,
    plan_shards,
    versions,
)
from pflatents.storage.location import Location
from pflatents.storage.lock import StoreLock
from pflatents.storage.records import ShardRecords
from pflatents.storage.verify import ShardVerify

__all__ = ["LatentStore", "open_or_create", "store_kind", "store_lock"]


class LatentStore(ShardRecords, ShardVerify, Growth):
    """A pflatents Zarr v3 store: latents, NFE, per-shard records and the pinned config."""

    def __init__(self, loc: Location, group: zarr.Group, read_only: bool) -> None:
        self._loc, self._group, self.read_only = loc, group, read_only
        self.meta: dict[str, Any] = dict(group.attrs[ATTR])  # type: ignore[arg-type]
        self._latents: zarr.Array = group["latents"]  # type: ignore[assignment]
        self._nfe: zarr.Array = group["nfe"]  # type: ignore[assignment]
        self._status: zarr.Array | None = group["status"] if "status" in group else None  # type: ignore[assignment]
        self._sample_ids: zarr.Array | None = group["sample_id"] if "sample_id" in group else None  # type: ignore[assignment]
        self._labels: zarr.Array | None = group["label"] if "label" in group else None  # type: ignore[assignment]
        self._lock = loc.new_lock()
        self._fence: str | None = None

    # ---- create / open -------------------------------------------------------------------

    @classmethod
    def create(cls, url: str | os.PathLike[str], *, config: Mapping[str, Any], n_samples: int,
               sample_shape: tuple[int, ...], shard_size: int,
               storage_options: dict[str, Any] | None = None,
               data_prefix: Mapping[str, Any] | None = None, sample_ids: bool = False,
               labels: bool = False) -> LatentStore:
        """Create a new store at ``url`` (an empty or absent path, or an incomplete store).

        ``sample_ids`` / ``labels``: the store keeps each sample's id / class label (arrays
        ``sample_id`` and ``label``); every shard write then gives them.

        With ``data_prefix`` ({"n", "fingerprint"} of the data planned) the store is incremental:
        it can ``grow`` later, and publishes ``n_samples`` (0 until the first ``publish``).

        Raises:
            NotAStoreError: something that is not a pflatents store exists there.
            StoreError: a complete store already exists there, the path is unwritable, or the
                sizes are invalid.
        """
        loc = Location.parse(url, storage_options)
        sample_shape = tuple(int(d) for d in sample_shape)
        check_layout(n_samples, sample_shape, shard_size)
        kind = loc.classify()
        if kind == "complete":
            raise StoreError(f"a pflatents store already exists at {loc.url}; open or resume it")
        if kind == "foreign":
            raise NotAStoreError(
                f"{loc.url} exists and is not a pflatents store; refusing to write into it\n"
                f"choose a new output path (or an empty directory)")
        meta = {"format_version": FORMAT_VERSION, "config": to_json(config),
                "config_hash": config_hash(config), "versions": versions(), "created": now(),
                "n_samples": int(n_samples), "sample_shape": list(sample_shape),
                "shard_size": int(shard_size),
                "n_shards": len(plan_shards(int(n_samples), int(shard_size)))}
        if data_prefix is not None:
            meta.update(incremental=True, n_planned=int(n_samples), n_samples=0,
                        data_prefix=to_json(dict(data_prefix), "data_prefix"))
        try:
            group = build(loc, meta, incomplete=kind == "incomplete", sample_ids=sample_ids, labels=labels)
        except OSError as exc:
            raise StoreError(f"cannot write a store at {loc.url}: {exc}") from exc
        return cls(loc, group, read_only=False)

    @classmethod
    def open(cls, url: str | os.PathLike[str], mode: Literal["r", "r+"] = "r+",
             storage_options: dict[str, Any] | None = None) -> LatentStore:
        """Open an existing pflatents store (``mode`` "r" read-only, "r+" read/write).

        Raises:
            NotAStoreError: nothing, something else or an incomplete store is at ``url``.
        """
        if mode not in ("r", "r+"):
            raise StoreError(f"mode must be 'r' or 'r+', got {mode!r}")
        loc = Location.parse(url, storage_options)
        kind = loc.classify()
        if kind != "complete":
            raise NotAStoreError(not_a_store_message(loc.url, kind))
        group = zarr.open_group(loc.zarr_store(read_only=mode == "r"), mode=mode, zarr_format=3)
        version = dict(group.attrs[ATTR]).get("format_version")  # type: ignore[arg-type]
        if version not in READABLE_VERSIONS:
            raise StoreError(f"{loc.url} has store format_version {version}; this pflatents "
                             f"reads versions {', '.join(map(str, READABLE_VERSIONS))}")
        return cls(loc, group, read_only=mode == "r")

    def check_matches(self, config: Mapping[str, Any], n_samples: int | None,
                      sample_shape: tuple[int, ...], shard_size: int) -> None:
        """Raise ``ConfigMismatchError`` naming each field that differs from the pinned config.

        ``n_samples=None`` (incremental stores) leaves the length out: it may grow.
        """
        stored = {"sample_shape": list(self.sample_shape), "shard_size": self.shard_size}
        new = {"sample_shape": [int(d) for d in sample_shape], "shard_size": int(shard_size)}
        if n_samples is not None:
            stored["n_samples"], new["n_samples"] = self.n_samples, int(n_samples)
        diffs = config_diff(self.config, to_json(config), "config") + config_diff(stored, new)
        if not diffs and self.config_hash != config_hash(config):
            diffs = [("config_hash", self.config_hash, config_hash(config))]
        if diffs:
            raise ConfigMismatchError(
                f"store {self.url} was made with a different config: {format_diff(diffs)}\n"
                f"use a new output path for the new settings (the store was not changed)", diffs)

    # ---- layout --------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The store's path or URL."""
        return self._loc.url

    @property
    def config(self) -> dict[str, Any]:
        """The pinned config (plain JSON)."""
        return dict(self.meta["config"])

    @property
    def format_version(self) -> int:
        """The store format it was written in (``READABLE_VERSIONS``; ``upgrade`` brings it to the current one)."""
        return int(self.meta["format_version"])

    def upgrade(self, config: Mapping[str, Any]) -> bool:
        """Rewrite a store of an earlier format in the current one (the coordinator's, under the store
        lock, once its config check passed): ``config`` is its pinned config in the current form (the
        caller's migration; the same settings). One attrs write; the data and records are not touched.
        Returns False when the store already has the current format."""
        if self.format_version == FORMAT_VERSION:
            return False
        self._check_writable()
        self.meta.update(format_version=FORMAT_VERSION, config=to_json(config), config_hash=config_hash(config),
                         upgraded={"from": self.format_version, "at": now()})
        self._put_meta()
        return True

    def pin_config(self, config: Mapping[str, Any]) -> None:
        """Replace the pinned config before any shard ran: a step of the job that settles a setting first
        (the ``--latent-tol`` pilot's choice of solver), under the coordinator's lock (a fenced handle).
        One attrs write; refused once a shard has a record (its latents were made under the old config)."""
        self._check_writable()
        if self.shard_records():
            raise StoreError(f"store {self.url} already has shard records; its pinned config cannot change")
        self.meta.update(config=to_json(config), config_hash=config_hash(config))
        self._put_meta()

    @property
    def config_hash(self) -> str:
        """SHA-256 of the canonical JSON of the pinned config."""
        return str(self.meta["config_hash"])

    @property
    def n_samples(self) -> int:
        """Number of samples N (incremental stores: the published count, all shards below done)."""
        return int(self.meta["n_samples"])

    @property
    def n_planned(self) -> int:
        """Length of the arrays and of the shard plan (= ``n_samples`` unless a growth is open)."""
        return int(self.meta.get("n_planned", self.meta["n_samples"]))

    @property
    def incremental(self) -> bool:
        """True if the store follows a growing source (``grow`` / ``publish``)."""
        return bool(self.meta.get("incremental", False))

    @property
    def data_prefix(self) -> dict[str, Any] | None:
        """{"n", "fingerprint"} of the source data the plan covers (incremental stores)."""
        prefix = self.meta.get("data_prefix")
        return dict(prefix) if isinstance(prefix, dict) else None

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """Shape of one latent sample."""
        return tuple(int(d) for d in self.meta["sample_shape"])

    @property
    def shard_size(self) -> int:
        """Samples per shard (= the latents chunk length)."""
        return int(self.meta["shard_size"])

    @property
    def n_shards(self) -> int:
        """Number of shards."""
        return int(self.meta["n_shards"])

    def shard_range(self, shard_id: int) -> tuple[int, int]:
        """Sample index range ``[i0, i1)`` of shard ``shard_id``."""
        if not 0 <= int(shard_id) < self.n_shards:
            raise StoreError(f"shard {shard_id} does not exist: {self.url} has {self.n_shards} "
                             f"shards (0..{self.n_shards - 1})")
        i0 = int(shard_id) * self.shard_size
        return i0, min(self.n_planned, i0 + self.shard_size)

    def latents_array(self) -> zarr.Array:
        """The ``latents`` zarr array (float32, N x sample_shape)."""
        return self._latents

    def nfe_array(self) -> zarr.Array:
        """The ``nfe`` zarr array (int32, N)."""
        return self._nfe

    def dask_rows(self, target_bytes: int = 128 * MiB) -> int:
        """Rows per dask chunk: a multiple of ``shard_size`` near ``target_bytes``."""
        sample_nbytes = 4 * math.prod(self.sample_shape)
        per = max(1, target_bytes // (sample_nbytes * self.shard_size))
        return max(1, min(self.n_samples, per * self.shard_size))

    def latents_dask(self, rows: int | None = None) -> Any:
        """The latents ``[:n_samples]`` as a dask array with ``rows`` samples per chunk."""
        import dask.array as da

        rows = rows or self.dask_rows()
        x = da.from_zarr(self.latents_array(), chunks=(rows, *self.sample_shape))
        return x[: self.n_samples] if x.shape[0] != self.n_samples else x

    def open_xarray(self, rows: int | None = None) -> Any:
        """The store as an ``xarray.Dataset`` (named dims, attrs carry the config)."""
        import xarray as xr

        target = str(self._loc.local) if self._loc.local is not None else self.url
        opts = self._loc.storage_options or None
        ds = xr.open_zarr(target, consolidated=False, storage_options=opts,
                          chunks={"sample": rows or self.dask_rows()})
        ds = ds.set_coords([c for c in ("sample_id", "label") if c in ds.data_vars])
        return ds.isel(sample=slice(0, self.n_samples)) if self.n_planned != self.n_samples else ds

    # ---- lock ----------------------------------------------------------------------------

    @property
    def lock_path(self) -> str:
        """Path or URL of the lock object."""
        return self._lock.path

    def acquire_lock(self, owner_info: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Take the store lock, or raise ``StoreLockedError`` naming the live holder."""
        return self._lock.acquire(dict(owner_info or {}))

    def release_lock(self) -> None:
        """Release the store lock if this object holds it."""
        self._lock.release()

    @contextmanager
    def locked(self, owner_info: Mapping[str, Any] | None = None) -> Iterator[LatentStore]:
        """Hold the store lock for the ``with`` block (writes through this handle are fenced)."""
        record = self.acquire_lock(owner_info)
        self.fence(record["token"])
        try:
            yield self
        finally:
            self.fence(None)
            self.release_lock()

    def ensure_status_array(self) -> bool:
        """Add the per-sample status array to a store made before it (all samples ok); True if
        added. The coordinator calls this under the store lock, before tasks write."""
        if self._status is not None or self.read_only:
            return False
        self._check_fence()
        self._status = create_status_array(self._group, self.n_planned, self.shard_size)
        return True

    def lock_token(self) -> str | None:
        """The token of the store lock's live holder, or None when nobody holds it."""
        holder = self._lock.holder()
        return None if holder is None else holder.get("token")

    def fence(self, token: str | None) -> None:
        """Make every record and metadata write through this handle first check that the store
        lock is still held under ``token`` (``LeaseLostError`` if not); None turns that off."""
        self._fence = token

    def _check_fence(self) -> None:
        """Refuse to write when the lock this handle was fenced on is no longer held."""
        if self._fence is not None:
            self._lock.check(self._fence)

    def __repr__(self) -> str:
        return (f"LatentStore({self.url!r}, n_samples={self.n_samples}, "
                f"sample_shape={self.sample_shape}, shard_size={self.shard_size})")


def store_kind(url: str | os.PathLike[str], storage_options: dict[str, Any] | None = None
               ) -> Literal["absent", "incomplete", "complete", "foreign"]:
    """What is at ``url``: nothing, an interrupted creation, a pflatents store, or something else."""
    return Location.parse(url, storage_options).classify()


def store_lock(url: str | os.PathLike[str], storage_options: dict[str, Any] | None = None
               ) -> StoreLock:
    """The lock of the store at ``url``; usable before the store exists (create tolerates it)."""
    return Location.parse(url, storage_options).new_lock()


def open_or_create(url: str | os.PathLike[str], *, config: Mapping[str, Any], n_samples: int,
                   sample_shape: tuple[int, ...], shard_size: int,
                   storage_options: dict[str, Any] | None = None,
                   data_prefix: Mapping[str, Any] | None = None, sample_ids: bool = False,
                   labels: bool = False) -> LatentStore:
    """Open the store at ``url`` if its pinned config matches, else create it if absent.

    ``sample_ids`` / ``labels`` apply to a new store (``LatentStore.create``).

    With ``data_prefix`` the store is incremental: a new one is created as such, an existing one
    must be incremental and is matched without its length (the caller grows it under the lock).

    Raises:
        ConfigMismatchError: a store with a different config exists (it is left untouched).
        NotAStoreError: something that is not a pflatents store exists at ``url``.
    """
    loc = Location.parse(url, storage_options)
    if loc.classify() != "complete":  # create() refuses what is not a pflatents store
        return LatentStore.create(url, config=config, n_samples=n_samples,
                                  sample_shape=sample_shape, shard_size=shard_size,
                                  storage_options=storage_options, data_prefix=data_prefix,
                                  sample_ids=sample_ids, labels=labels)
    store = LatentStore.open(url, mode="r+", storage_options=storage_options)
    incremental = data_prefix is not None
    store.check_matches(config, None if incremental else n_samples, sample_shape, shard_size)
    if store.incremental != incremental:
        kind = "incremental" if store.incremental else "fixed-length"
        raise ConfigMismatchError(
            f"store {store.url} is a {kind} store; extract into it "
            f"{'with' if store.incremental else 'without'} --incremental, or use a new output path",
            [("incremental", store.incremental, incremental)])
    return store
