"""The latent store: one Zarr v3 group per extraction (layout contract in docs/ARCHITECTURE.md).

Layout::

    <store>/zarr.json            group attrs "pflatents": format version, config, hash, versions...
    <store>/latents              float32 (N, *sample_shape), chunks (shard_size, *sample_shape)
    <store>/nfe                  int32 (N,), chunks (shard_size,)
    <store>/shards/<id:06d>      one child group per shard; its attrs are the shard record:
                                 "writing" (chunk being written), "done" (verified) or "failed";
                                 no record = pending. Each record is its own zarr.json, replaced
                                 atomically (temp file + rename; one PUT on object stores)
    <store>/lock/owner.json      the store lock while an extract runs

Incremental stores (a growing source) keep two extents in the attrs: ``n_planned``, the length of
the arrays and of the shard plan, and ``n_samples``, the published count: every shard below it is
done. The coordinator (under the store lock) grows the arrays to the new ``n_planned`` before any
task writes, and publishes ``n_samples`` after all shards are done, so a reader that slices
``[:n_samples]`` (``latents_dask``, ``open_xarray``) never sees unwritten rows. ``data_prefix``
holds the length and fingerprint of the data the plan covers, to refuse data that changed there.

Each shard owns whole storage objects (its latents chunk, its nfe chunk, its record), so shards are
written concurrently by many processes without locks on data. No sharding codec (zarr-python#3682).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import math
import os
import socket
import sys
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import google_crc32c
import numpy as np
import zarr
from zarr.codecs import ZstdCodec

from pflatents.storage.config import config_diff, config_hash, format_diff, to_json
from pflatents.storage.errors import (
    ConfigMismatchError,
    NotAStoreError,
    ShardVerifyError,
    StoreError,
)
from pflatents.storage.lock import StoreLock

__all__ = [
    "FORMAT_VERSION",
    "LatentStore",
    "config_hash",
    "default_shard_size",
    "dimension_names",
    "open_or_create",
    "plan_shards",
    "store_lock",
]

FORMAT_VERSION = 1
ATTR = "pflatents"
INCOMPLETE_ATTR = "pflatents_incomplete"
MiB = 1 << 20
PAUSE_ENV = "PFLATENTS_PAUSE_IN_WRITE"  # test hook: seconds to sleep after the latents write


def _now() -> str:
    """Current UTC time as ISO 8601 text."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def plan_shards(n_samples: int, shard_size: int) -> list[tuple[int, int]]:
    """Cut ``[0, n_samples)`` into ``[i*shard_size, min(N, (i+1)*shard_size))`` ranges."""
    if n_samples < 0 or shard_size < 1:
        raise StoreError(f"cannot plan shards of {shard_size} samples over {n_samples} samples")
    return [(i0, min(n_samples, i0 + shard_size)) for i0 in range(0, n_samples, shard_size)]


def default_shard_size(sample_nbytes: int, n_samples: int | None = None, *,
                       target_bytes: int = 8 * MiB, multiple: int = 64) -> int:
    """Samples per shard so one latents chunk holds about ``target_bytes`` (clipped to N).

    Chunks of a few MB write ~6x faster than 64 KB ones (docs/ENVIRONMENT.md). Sizes of at least
    ``multiple`` samples are rounded down to a multiple of it, so batch sizes divide them.
    """
    if sample_nbytes < 1:
        raise StoreError(f"sample size must be at least 1 byte, got {sample_nbytes}")
    size = max(1, target_bytes // sample_nbytes)
    if size >= multiple:
        size -= size % multiple
    if n_samples is not None:
        size = max(1, min(size, n_samples))
    return size


def dimension_names(sample_ndim: int) -> tuple[str, ...]:
    """Zarr ``dimension_names`` of the latents array for samples with ``sample_ndim`` axes."""
    if sample_ndim == 1:
        return ("sample", "dim")
    if sample_ndim == 3:
        return ("sample", "channel", "height", "width")
    return ("sample", *(f"dim_{i}" for i in range(sample_ndim)))


def _versions() -> dict[str, str]:
    """Versions of the packages that shape the latents (read from metadata, nothing imported)."""
    out = {"python": sys.version.split()[0]}
    for name in ("pflatents", "zarr", "numpy", "torch"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


CHECKSUM_ALGORITHM = "crc32c"  # of new records; older "blake2b:" records still verify


def _le_bytes(a: np.ndarray, dtype: str) -> np.ndarray:
    """``a`` as a flat read-only little-endian byte view (no copy if it already is ``dtype``)."""
    v = np.ascontiguousarray(a, dtype=dtype).reshape(-1).view(np.uint8)
    v.flags.writeable = False  # google_crc32c takes read-only buffers only
    return v


def checksum(latents: np.ndarray, nfe: np.ndarray, algorithm: str = CHECKSUM_ALGORITHM) -> str:
    """Checksum of a shard: its little-endian float32 latents bytes followed by its int32 NFE bytes.

    ``algorithm`` "crc32c" (CRC-32C, ~20 GB/s; the default, written as ``crc32c:<8 hex>``) or
    "blake2b" (160-bit, ~0.6 GB/s; what older records hold, written as ``blake2b:<40 hex>``).
    """
    lat, counts = _le_bytes(latents, "<f4"), _le_bytes(nfe, "<i4")
    if algorithm == "crc32c":
        return f"crc32c:{google_crc32c.extend(google_crc32c.value(lat), counts):08x}"
    if algorithm == "blake2b":
        h = hashlib.blake2b(digest_size=20)
        h.update(lat)
        h.update(counts)
        return "blake2b:" + h.hexdigest()
    raise StoreError(f"unknown checksum algorithm {algorithm!r} (known: crc32c, blake2b)")


def _bad_rows(x: np.ndarray) -> np.ndarray:
    """Indices of rows of ``x`` holding any NaN or Inf."""
    finite = np.isfinite(x)
    if finite.all():  # the common case, without the slower per-row reduction
        return np.empty(0, dtype=np.intp)
    return np.flatnonzero(~finite.reshape(len(x), -1).all(axis=1))


@dataclass(frozen=True)
class _Location:
    """Where a store lives: a local directory or an fsspec URL."""

    url: str
    local: Path | None
    storage_options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, url: str | os.PathLike[str], storage_options: dict[str, Any] | None = None
              ) -> _Location:
        """Local paths and ``file://`` URLs become paths; anything else with ``://`` is fsspec."""
        text = os.fspath(url)
        if text.startswith("file://"):
            text = text[len("file://"):]
        if "://" in text:
            return cls(text.rstrip("/"), None, dict(storage_options or {}))
        return cls(text, Path(text).expanduser().absolute(), {})

    def fs(self) -> tuple[Any, str]:
        """The (sync) fsspec filesystem and root path of a remote store."""
        import fsspec

        return fsspec.core.url_to_fs(self.url, **self.storage_options)

    def zarr_store(self, read_only: bool) -> Any:
        """A zarr Store object for this location."""
        if self.local is not None:
            return zarr.storage.LocalStore(self.local, read_only=read_only)
        return zarr.storage.FsspecStore.from_url(
            self.url, storage_options=self.storage_options or None, read_only=read_only)

    def read_json(self, key: str) -> dict[str, Any] | None:
        """Parse the JSON object at ``key`` under the root; None if absent or not JSON."""
        try:
            if self.local is not None:
                text = (self.local / key).read_bytes()
            else:
                fs, root = self.fs()
                text = fs.cat_file(f"{root}/{key}")
            value = json.loads(text)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError, ValueError):
            return None
        return value if isinstance(value, dict) else None

    def read_json_many(self, keys: list[str]) -> dict[str, dict[str, Any]]:
        """Parse several JSON objects (missing or malformed ones are left out)."""
        if self.local is not None or not keys:
            found = {k: self.read_json(k) for k in keys}
        else:
            fs, root = self.fs()
            blobs = fs.cat([f"{root}/{k}" for k in keys], on_error="omit")
            found = {k: _loads(blobs.get(f"{root}/{k}")) for k in keys}
        return {k: v for k, v in found.items() if v is not None}

    def write_json(self, key: str, value: dict[str, Any]) -> None:
        """Write one JSON object atomically (temp file + rename; one PUT on object stores)."""
        data = json.dumps(value, indent=2).encode()
        if self.local is None:
            fs, root = self.fs()
            fs.pipe_file(f"{root}/{key}", data)
            return
        path = self.local / key
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}.partial")
        try:
            tmp.write_bytes(data)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def list_dir(self, key: str) -> list[str]:
        """Names directly under ``key`` (empty if it does not exist)."""
        if self.local is not None:
            try:
                return [e.name for e in os.scandir(self.local / key)]
            except FileNotFoundError:
                return []
        fs, root = self.fs()
        fs.invalidate_cache(f"{root}/{key}")  # other processes add records: never trust a listing cache
        try:
            return [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(f"{root}/{key}", detail=False)]
        except FileNotFoundError:
            return []

    def is_empty(self) -> bool:
        """True if nothing exists at the location (or only an empty directory, or our lock)."""
        if self.local is not None:
            if not self.local.exists():
                return True
            return self.local.is_dir() and {p.name for p in self.local.iterdir()} <= {"lock"}
        fs, root = self.fs()
        fs.invalidate_cache(root)
        return not fs.exists(root) or not fs.ls(root)

    def classify(self) -> Literal["absent", "incomplete", "complete", "foreign"]:
        """What is at this location, judged from the root ``zarr.json``."""
        meta = self.read_json("zarr.json")
        if meta is None:
            return "absent" if self.is_empty() else "foreign"
        if meta.get("zarr_format") != 3 or meta.get("node_type") != "group":
            return "foreign"
        attrs = meta.get("attributes") or {}
        if ATTR in attrs:
            return "complete"
        return "incomplete" if INCOMPLETE_ATTR in attrs else "foreign"

    def new_lock(self) -> StoreLock:
        """The lock object of this store."""
        if self.local is not None:
            return StoreLock(self.local)
        fs, root = self.fs()
        return StoreLock(None, fs=fs, root=root, url=self.url)


def _loads(blob: bytes | None) -> dict[str, Any] | None:
    """Parse a JSON object from bytes; None if absent or malformed."""
    try:
        value = json.loads(blob) if blob else None
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _check_layout(n_samples: int, sample_shape: tuple[int, ...], shard_size: int) -> None:
    """Refuse sizes that cannot make a store."""
    if int(n_samples) < 1:
        raise StoreError(f"a store needs at least one sample, got n_samples={n_samples}")
    if len(sample_shape) < 1 or any(int(d) < 1 for d in sample_shape):
        raise StoreError(f"sample_shape must have at least one axis, all >= 1; got {sample_shape}")
    if int(shard_size) < 1:
        raise StoreError(f"shard_size must be >= 1, got {shard_size}")


class LatentStore:
    """A pflatents Zarr v3 store: latents, NFE, per-shard records and the pinned config."""

    def __init__(self, loc: _Location, group: zarr.Group, read_only: bool) -> None:
        self._loc, self._group, self.read_only = loc, group, read_only
        self.meta: dict[str, Any] = dict(group.attrs[ATTR])  # type: ignore[arg-type]
        self._latents: zarr.Array = group["latents"]  # type: ignore[assignment]
        self._nfe: zarr.Array = group["nfe"]  # type: ignore[assignment]
        self._lock = loc.new_lock()

    # ---- create / open -------------------------------------------------------------------

    @classmethod
    def create(cls, url: str | os.PathLike[str], *, config: Mapping[str, Any], n_samples: int,
               sample_shape: tuple[int, ...], shard_size: int,
               storage_options: dict[str, Any] | None = None,
               data_prefix: Mapping[str, Any] | None = None) -> LatentStore:
        """Create a new store at ``url`` (an empty or absent path, or an incomplete store).

        With ``data_prefix`` ({"n", "fingerprint"} of the data planned) the store is incremental:
        it can ``grow`` later, and publishes ``n_samples`` (0 until the first ``publish``).

        Raises:
            NotAStoreError: something that is not a pflatents store exists there.
            StoreError: a complete store already exists there, the path is unwritable, or the
                sizes are invalid.
        """
        loc = _Location.parse(url, storage_options)
        sample_shape = tuple(int(d) for d in sample_shape)
        _check_layout(n_samples, sample_shape, shard_size)
        kind = loc.classify()
        if kind == "complete":
            raise StoreError(f"a pflatents store already exists at {loc.url}; open or resume it")
        if kind == "foreign":
            raise NotAStoreError(
                f"{loc.url} exists and is not a pflatents store; refusing to write into it\n"
                f"choose a new output path (or an empty directory)")
        meta = {"format_version": FORMAT_VERSION, "config": to_json(config),
                "config_hash": config_hash(config), "versions": _versions(), "created": _now(),
                "n_samples": int(n_samples), "sample_shape": list(sample_shape),
                "shard_size": int(shard_size),
                "n_shards": len(plan_shards(int(n_samples), int(shard_size)))}
        if data_prefix is not None:
            meta.update(incremental=True, n_planned=int(n_samples), n_samples=0,
                        data_prefix=to_json(dict(data_prefix), "data_prefix"))
        try:
            group = _build(loc, meta, incomplete=kind == "incomplete")
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
        loc = _Location.parse(url, storage_options)
        kind = loc.classify()
        if kind != "complete":
            raise NotAStoreError(_not_a_store_message(loc.url, kind))
        group = zarr.open_group(loc.zarr_store(read_only=mode == "r"), mode=mode, zarr_format=3)
        version = dict(group.attrs[ATTR]).get("format_version")  # type: ignore[arg-type]
        if version != FORMAT_VERSION:
            raise StoreError(f"{loc.url} has store format_version {version}; this pflatents "
                             f"reads version {FORMAT_VERSION}")
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
        return ds.isel(sample=slice(0, self.n_samples)) if self.n_planned != self.n_samples else ds

    # ---- shards --------------------------------------------------------------------------

    def write_shard(self, shard_id: int, latents: np.ndarray, nfe: np.ndarray,
                    info: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Write, read back and verify one shard, then record it done; returns the record.

        Raises:
            StoreError: wrong shape or dtype for this shard, or the store is read-only.
            ShardVerifyError: non-finite latents (nothing written) or a read-back mismatch.
        """
        self._check_writable()
        i0, i1 = self.shard_range(shard_id)
        x = self._as_latents(shard_id, latents, i1 - i0)
        n = self._as_nfe(shard_id, nfe, i1 - i0)
        bad = _bad_rows(x)
        if bad.size:
            raise ShardVerifyError(f"shard {shard_id} (samples {i0}..{i1 - 1}) has NaN/Inf "
                                   f"latents at samples {_first(bad + i0)}; not written")
        self._put_record(shard_id, {**self._base_record(shard_id), "state": "writing",
                                    "finished": None, "started": _now()})
        t0 = time.perf_counter()
        # write_empty_chunks: skip zarr's "is this chunk all fill value (NaN)?" scan of every
        # chunk (several passes over it); x is finite, so it never equals the NaN fill anyway
        self._latents.with_config({"write_empty_chunks": True})[i0:i1] = x
        _test_pause()
        self._nfe.with_config({"write_empty_chunks": True})[i0:i1] = n
        t1 = time.perf_counter()
        problem, digest = self._read_back(i0, i1, x, n)
        if problem:
            raise ShardVerifyError(f"shard {shard_id} (samples {i0}..{i1 - 1}) failed "
                                   f"read-back verification: {problem}; not marked done")
        timings = {"write_s": t1 - t0, "verify_s": time.perf_counter() - t1}
        record = self._record(shard_id, "done", None, digest, info, timings)
        self._put_record(shard_id, record)
        return record

    def mark_failed(self, shard_id: int, error: str, info: Mapping[str, Any] | None = None
                    ) -> dict[str, Any]:
        """Record shard ``shard_id`` as failed with ``error`` (its data is left as it is)."""
        self._check_writable()
        record = self._record(shard_id, "failed", str(error)[:4000], None, info, {})
        self._put_record(shard_id, record)
        return record

    def shard_record(self, shard_id: int) -> dict[str, Any] | None:
        """The record of one shard, or None if it has none yet (pending)."""
        self.shard_range(shard_id)
        return _record_of(self._loc.read_json(_record_key(int(shard_id))))

    def shard_records(self) -> dict[int, dict[str, Any]]:
        """All shard records by shard id (shards without a record are pending)."""
        ids = sorted(int(n) for n in self._loc.list_dir("shards") if n.isdigit())
        found = self._loc.read_json_many([_record_key(i) for i in ids])
        records = {i: _record_of(found.get(_record_key(i))) for i in ids}
        return {i: r for i, r in records.items() if r is not None}

    def pending_shards(self) -> list[int]:
        """Ids of shards not done (never started, in progress, crashed or failed)."""
        records = self.shard_records()
        return [i for i in range(self.n_shards) if records.get(i, {}).get("state") != "done"]

    def status(self) -> dict[str, Any]:
        """Counts of done / failed / pending shards (they sum to ``n_shards``) and the config."""
        records = self.shard_records()
        states = [records.get(i, {}).get("state") for i in range(self.n_shards)]
        failed = [{"id": i, "error": records[i].get("error")}
                  for i, s in enumerate(states) if s in ("failed", "corrupt")]
        done = states.count("done")
        return {"url": self.url, "n_shards": self.n_shards, "done": done, "failed": len(failed),
                "pending": self.n_shards - done - len(failed), "n_samples": self.n_samples,
                "n_planned": self.n_planned, "incremental": self.incremental,
                "sample_shape": list(self.sample_shape), "shard_size": self.shard_size,
                "failed_shards": failed, "config_hash": self.config_hash, "config": self.config,
                "created": self.meta.get("created"), "lock": self._lock.holder()}

    def verify_shard(self, shard_id: int) -> bool:
        """Re-read a done shard: True if it is finite and matches the recorded checksum."""
        record = self.shard_record(shard_id)
        if record is None or record.get("state") != "done":
            return False
        return self.shard_problem(shard_id, record) is None

    def shard_problem(self, shard_id: int, record: Mapping[str, Any]) -> str | None:
        """What is wrong with a done shard's stored data (None if it matches its record)."""
        i0, i1 = self.shard_range(shard_id)
        if (record.get("start"), record.get("stop")) != (i0, i1):
            return (f"record covers samples {record.get('start')}..{record.get('stop')}, "
                    f"the shard is {i0}..{i1}")
        return self._check_chunk(i0, i1, str(record.get("checksum")))

    def verify(self, mark: bool = True, workers: int = 8) -> dict[str, Any]:
        """Re-read every done shard (checksum, finiteness); mark bad ones "corrupt" if ``mark``.

        A corrupt shard is not done, so ``pending_shards`` (and ``resume``) re-queue it.
        Returns {"checked", "ok", "corrupt": [{"id", "error"}], "not_done"}.
        """
        from concurrent.futures import ThreadPoolExecutor

        if mark:
            self._check_writable()
        records = self.shard_records()
        done = [i for i in range(self.n_shards) if records.get(i, {}).get("state") == "done"]
        with ThreadPoolExecutor(max(1, workers)) as pool:
            problems = list(pool.map(lambda i: self.shard_problem(i, records[i]), done))
        corrupt = [{"id": i, "error": p} for i, p in zip(done, problems) if p is not None]
        for bad in corrupt if mark else []:
            self.mark_corrupt(bad["id"], bad["error"])
        return {"checked": len(done), "ok": len(done) - len(corrupt), "corrupt": corrupt,
                "not_done": self.n_shards - len(done)}

    def mark_corrupt(self, shard_id: int, error: str) -> dict[str, Any]:
        """Record a done shard whose data no longer verifies as "corrupt" (re-queued on resume)."""
        self._check_writable()
        record = {**self._base_record(shard_id), "state": "corrupt", "device": None,
                  "error": f"verify: {error}"[:4000], "checksum": None, "timings": {}}
        self._put_record(shard_id, record)
        return record

    # ---- growth (incremental stores; the coordinator calls these under the store lock) -----

    def grow(self, n_new: int, data_prefix: Mapping[str, Any]) -> list[int]:
        """Extend the plan to ``n_new`` samples; returns the shard ids added or re-opened.

        Order matters for crash safety: (1) a partial last shard loses its done record (its chunk
        will hold more samples, its checksum covers fewer), (2) the arrays grow, (3) the attrs
        name the new plan. A crash between steps leaves a store that the next run grows again.
        Readers are unaffected: they read ``[:n_samples]``, published only after the writes.
        """
        self._check_writable()
        if not self.incremental:
            raise StoreError(f"{self.url} is not an incremental store; it cannot grow")
        old, size = self.n_planned, self.shard_size
        if n_new < old:
            raise StoreError(f"cannot shrink {self.url} from {old} to {n_new} samples")
        if n_new == old:
            return []
        first = old // size
        if old % size:  # the old last shard was partial: it is re-done over its full range
            self._put_record(first, {**self._base_record(first), "state": "grown", "error": None,
                                     "checksum": None, "timings": {}, "device": None})
        self._latents.resize((n_new, *self.sample_shape))
        self._nfe.resize((n_new,))
        self.meta.update(n_planned=int(n_new), n_shards=len(plan_shards(int(n_new), size)),
                         data_prefix=to_json(dict(data_prefix), "data_prefix"))
        self._put_meta()
        return list(range(first, self.n_shards))

    def publish(self) -> bool:
        """Publish ``n_samples = n_planned`` if every shard is done; True if it is published."""
        if self.n_samples == self.n_planned:
            return True
        if self.pending_shards():
            return False
        self._check_writable()
        self.meta["n_samples"] = self.n_planned
        self._put_meta()
        return True

    def _put_meta(self) -> None:
        """Rewrite the ``pflatents`` attrs (the coordinator's, under the store lock)."""
        self._group.attrs.update({ATTR: to_json(self.meta, "meta")})

    # ---- lock ----------------------------------------------------------------------------

    @property
    def lock_path(self) -> str:
        """Path or URL of the lock object (remove it by hand only if its holder is gone)."""
        return self._lock.path

    def acquire_lock(self, owner_info: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Take the store lock, or raise ``StoreLockedError`` naming the live holder."""
        return self._lock.acquire(dict(owner_info or {}))

    def release_lock(self) -> None:
        """Release the store lock if this object holds it."""
        self._lock.release()

    @contextmanager
    def locked(self, owner_info: Mapping[str, Any] | None = None) -> Iterator[LatentStore]:
        """Hold the store lock for the ``with`` block."""
        self.acquire_lock(owner_info)
        try:
            yield self
        finally:
            self.release_lock()

    def __repr__(self) -> str:
        return (f"LatentStore({self.url!r}, n_samples={self.n_samples}, "
                f"sample_shape={self.sample_shape}, shard_size={self.shard_size})")

    # ---- helpers -------------------------------------------------------------------------

    def _check_writable(self) -> None:
        """Refuse writes through a read-only handle."""
        if self.read_only:
            raise StoreError(f"store {self.url} was opened read-only (mode='r')")

    def _base_record(self, shard_id: int) -> dict[str, Any]:
        """Fields every record carries: sample range, host, pid, finish time."""
        i0, i1 = self.shard_range(shard_id)
        return {"start": i0, "stop": i1, "host": socket.gethostname(), "pid": os.getpid(),
                "finished": _now()}

    def _record(self, shard_id: int, state: str, error: str | None, digest: str | None,
                info: Mapping[str, Any] | None, timings: dict[str, float]) -> dict[str, Any]:
        """A final shard record: the caller's ``info`` (device, timings, ...) plus our fields."""
        extra = to_json(dict(info or {}), "info")
        timings = {**(extra.get("timings") or {}), **timings}
        return {"device": None, **extra, **self._base_record(shard_id), "state": state,
                "error": error, "checksum": digest, "timings": to_json(timings, "timings")}

    def _put_record(self, shard_id: int, record: dict[str, Any]) -> None:
        """Replace the record of one shard: its own group ``zarr.json``, written atomically."""
        node = {"zarr_format": 3, "node_type": "group", "attributes": record}
        self._loc.write_json(_record_key(int(shard_id)), node)

    def _as_latents(self, shard_id: int, latents: Any, n: int) -> np.ndarray:
        """Validate a shard's latents and return them as contiguous float32."""
        x = np.asarray(latents)
        expected = (n, *self.sample_shape)
        if x.shape != expected:
            raise StoreError(f"shard {shard_id}: latents have shape {x.shape}, expected {expected}")
        if x.dtype.kind != "f":
            raise StoreError(f"shard {shard_id}: latents have dtype {x.dtype}; floats required")
        with np.errstate(over="ignore"):
            return np.ascontiguousarray(x, dtype=np.float32)

    def _as_nfe(self, shard_id: int, nfe: Any, n: int) -> np.ndarray:
        """Validate a shard's NFE counts and return them as int32."""
        v = np.asarray(nfe)
        if v.shape != (n,):
            raise StoreError(f"shard {shard_id}: nfe has shape {v.shape}, expected {(n,)}")
        if v.dtype.kind not in "iu":
            raise StoreError(f"shard {shard_id}: nfe has dtype {v.dtype}; integers required")
        if n and (v.min() < 0 or v.max() > np.iinfo(np.int32).max):
            raise StoreError(f"shard {shard_id}: nfe values must lie in 0..2**31-1, "
                             f"got {v.min()}..{v.max()}")
        return np.ascontiguousarray(v, dtype=np.int32)

    def _read_chunk(self, i0: int, i1: int) -> tuple[np.ndarray, np.ndarray] | str:
        """Samples ``[i0, i1)`` (latents, nfe) as stored, or why they cannot be read."""
        try:
            return np.asarray(self._latents[i0:i1]), np.asarray(self._nfe[i0:i1])
        except Exception as exc:  # a corrupt chunk fails to decode in codec-specific ways
            return f"cannot read the chunk back ({type(exc).__name__}: {exc})"

    def _read_back(self, i0: int, i1: int, x: np.ndarray, n: np.ndarray
                   ) -> tuple[str | None, str | None]:
        """Re-read what ``write_shard`` just wrote: (problem or None, checksum of the stored data).

        The stored data must equal ``x`` / ``n`` bit for bit (the stored latents are then
        finite too: ``x`` was checked before the write); the checksum is computed from the
        data read back, once.
        """
        got = self._read_chunk(i0, i1)
        if isinstance(got, str):
            return got, None
        y, m = np.asarray(got[0], dtype=np.float32), np.asarray(got[1], dtype=np.int32)
        if y.shape != x.shape or m.shape != n.shape:
            return f"read back shapes {y.shape}, {m.shape}, wrote {x.shape}, {n.shape}", None
        bits, want = y.view(np.uint32), x.view(np.uint32)  # bitwise: -0.0 != 0.0, NaN == NaN
        if not np.array_equal(bits, want):
            rows = np.flatnonzero((bits != want).reshape(len(y), -1).any(axis=1))
            return f"latents read back differ from those written at samples {_first(rows + i0)}", None
        if not np.array_equal(m, n):
            rows = np.flatnonzero(m != n)
            return f"nfe read back differ from those written at samples {_first(rows + i0)}", None
        return None, checksum(y, m)

    def _check_chunk(self, i0: int, i1: int, expected: str) -> str | None:
        """Re-read samples ``[i0, i1)``; return what is wrong with them, or None if all is well.

        ``expected`` is a record's checksum; its prefix names the algorithm (crc32c, blake2b).
        """
        algorithm = expected.split(":", 1)[0] if ":" in expected else ""
        if algorithm not in ("crc32c", "blake2b"):
            return f"the record holds no known checksum ({expected!r})"
        got = self._read_chunk(i0, i1)
        if isinstance(got, str):
            return got
        x, n = got
        bad = _bad_rows(x)
        if bad.size:
            return f"NaN/Inf at samples {_first(bad + i0)}"
        digest = checksum(x, n, algorithm)
        return None if digest == expected else f"checksum {digest} != recorded {expected}"


def _test_pause() -> None:
    """Sleep ``$PFLATENTS_PAUSE_IN_WRITE`` seconds: kill tests aim at a half-written shard."""
    seconds = float(os.environ.get(PAUSE_ENV) or 0)
    if seconds > 0:
        time.sleep(seconds)


def _record_key(shard_id: int) -> str:
    """Key of a shard record: the ``zarr.json`` of child group ``shards/<id:06d>``."""
    return f"shards/{shard_id:06d}/zarr.json"


def _record_of(node: dict[str, Any] | None) -> dict[str, Any] | None:
    """The record held in a shard group's metadata, or None if it holds none."""
    attrs = (node or {}).get("attributes")
    return dict(attrs) if isinstance(attrs, dict) and attrs else None


def _first(indices: np.ndarray, limit: int = 10) -> str:
    """The first ``limit`` indices as text, with the total when there are more."""
    head = ", ".join(str(int(i)) for i in indices[:limit])
    return head + (f" ... ({len(indices)} in all)" if len(indices) > limit else "")


def _not_a_store_message(url: str, kind: str) -> str:
    """Why ``url`` cannot be opened as a store."""
    if kind == "absent":
        return f"no pflatents store at {url} (nothing there)"
    if kind == "incomplete":
        return (f"{url} is an incomplete pflatents store (its creation was interrupted)\n"
                f"run extract again to re-create it")
    return f"{url} exists and is not a pflatents store (no zarr group with '{ATTR}' attributes)"


def _build(loc: _Location, meta: dict[str, Any], incomplete: bool) -> zarr.Group:
    """Build the store layout; the ``pflatents`` attrs are written last, marking it complete."""
    if loc.local is not None:
        loc.local.mkdir(parents=True, exist_ok=True)
    marker = {INCOMPLETE_ATTR: {"started": _now(), "host": socket.gethostname(),
                                "pid": os.getpid()}}
    store = loc.zarr_store(read_only=False)
    if incomplete:
        root = zarr.open_group(store, mode="r+", zarr_format=3)
        root.attrs.put(marker)
    else:
        root = zarr.create_group(store, zarr_format=3, attributes=marker)
    n = meta.get("n_planned", meta["n_samples"])
    shape, size = tuple(meta["sample_shape"]), meta["shard_size"]
    root.create_array("latents", shape=(n, *shape), chunks=(size, *shape), dtype="float32",
                      compressors=ZstdCodec(level=3), fill_value=np.nan,
                      dimension_names=dimension_names(len(shape)), overwrite=True)
    root.create_array("nfe", shape=(n,), chunks=(size,), dtype="int32",
                      compressors=ZstdCodec(level=3), fill_value=0,
                      dimension_names=("sample",), overwrite=True)
    root.create_group("shards", overwrite=True)
    if "lock" not in root:
        root.create_group("lock")
    root.attrs.put({ATTR: meta})
    return root


def store_lock(url: str | os.PathLike[str], storage_options: dict[str, Any] | None = None
               ) -> StoreLock:
    """The lock of the store at ``url``; usable before the store exists (create tolerates it)."""
    return _Location.parse(url, storage_options).new_lock()


def open_or_create(url: str | os.PathLike[str], *, config: Mapping[str, Any], n_samples: int,
                   sample_shape: tuple[int, ...], shard_size: int,
                   storage_options: dict[str, Any] | None = None,
                   data_prefix: Mapping[str, Any] | None = None) -> LatentStore:
    """Open the store at ``url`` if its pinned config matches, else create it if absent.

    With ``data_prefix`` the store is incremental: a new one is created as such, an existing one
    must be incremental and is matched without its length (the caller grows it under the lock).

    Raises:
        ConfigMismatchError: a store with a different config exists (it is left untouched).
        NotAStoreError: something that is not a pflatents store exists at ``url``.
    """
    loc = _Location.parse(url, storage_options)
    if loc.classify() != "complete":  # create() refuses what is not a pflatents store
        return LatentStore.create(url, config=config, n_samples=n_samples,
                                  sample_shape=sample_shape, shard_size=shard_size,
                                  storage_options=storage_options, data_prefix=data_prefix)
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
