"""The store layout: format constants, the shard plan, the default shard size, and building a new store.

Layout of a store (one Zarr v3 group per extraction)::

    <store>/zarr.json            group attrs "pflatents": format version, config, hash, versions...
    <store>/latents              float32 (N, *sample_shape), chunks (shard_size, *sample_shape)
    <store>/nfe                  int32 (N,), chunks (shard_size,)
    <store>/status               int8 (N,), chunks (shard_size,): per-sample status, 0 ok, 1 step_limit
                                 (the solver's step limit), 2 nonfinite; flagged samples hold NaN
                                 latents in a done shard (stores made before it: all ok)
    <store>/sample_id            string (N,) (zarr v3 "string", vlen-utf8), chunks (shard_size,): the
                                 source's id of each sample (file path, tar key, row key, row index)
    <store>/label                int64 (N,), chunks (shard_size,): class label, -1 unknown; only for
                                 sources with labels. Both are part of a shard's write and checksum;
                                 stores made before them have neither
    <store>/shards/<id:06d>      one child group per shard; its attrs are the shard record:
                                 "writing" (chunk being written), "done" (verified) or "failed";
                                 no record = pending. Each record is its own zarr.json, replaced
                                 atomically (temp file + rename; one PUT on object stores)
    <store>/lock/owner.json      the store lock (see ``pflatents.storage.lock``)

The ``pflatents`` attrs are written last: until then the root holds a ``pflatents_incomplete``
marker, so an interrupted creation is recognised and re-done, never mistaken for a store.
"""

from __future__ import annotations

import importlib.metadata
import os
import socket
import sys
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr
from zarr.codecs import ZstdCodec

from pflatents.storage.errors import StoreError

if TYPE_CHECKING:
    from pflatents.storage.location import Location

__all__ = ["FORMAT_VERSION", "READABLE_VERSIONS", "ATTR", "INCOMPLETE_ATTR", "MiB", "SAMPLE_STATUS", "now", "plan_shards",
           "shard_label",
           "default_shard_size", "dimension_names", "versions", "check_layout", "not_a_store_message", "build",
           "create_status_array"]

# 2: the pinned config spells out every setting (pflatents.tasks.config.migrate); a format-1 store is read
# as it is and upgraded once (LatentStore.upgrade) by the next extract or resume
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
ATTR = "pflatents"
INCOMPLETE_ATTR = "pflatents_incomplete"
MiB = 1 << 20
SAMPLE_STATUS = ("ok", "step_limit", "nonfinite")  # codes 0, 1, 2 of the status array (the solver's)


def now() -> str:
    """Current UTC time as ISO 8601 text."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def plan_shards(n_samples: int, shard_size: int) -> list[tuple[int, int]]:
    """Cut ``[0, n_samples)`` into ``[i*shard_size, min(N, (i+1)*shard_size))`` ranges."""
    if n_samples < 0 or shard_size < 1:
        raise StoreError(f"cannot plan shards of {shard_size} samples over {n_samples} samples")
    return [(i0, min(n_samples, i0 + shard_size)) for i0 in range(0, n_samples, shard_size)]


def shard_label(ids) -> str:
    """Shard ids as ranges, for run names and messages: ``[8, 9, 10, 12]`` -> ``8-10, 12``."""
    ids = sorted({int(i) for i in ids})
    parts: list[str] = []
    i = 0
    while i < len(ids):
        j = i
        while j + 1 < len(ids) and ids[j + 1] == ids[j] + 1:
            j += 1
        parts.append(str(ids[i]) if i == j else f"{ids[i]}-{ids[j]}")
        i = j + 1
    return ", ".join(parts)


def default_shard_size(sample_nbytes: int, n_samples: int | None = None, *,
                       target_bytes: int = 8 * MiB, multiple: int = 64) -> int:
    """Samples per shard so one latents chunk holds about ``target_bytes`` (clipped to N).

    Chunks of a few MB write ~6x faster than 64 KB ones (measured: benchmarks/README.md). Sizes of at least
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


def versions() -> dict[str, str]:
    """Versions of the packages that shape the latents (read from metadata, nothing imported)."""
    out = {"python": sys.version.split()[0]}
    for name in ("pflatents", "zarr", "numpy", "torch"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def check_layout(n_samples: int, sample_shape: tuple[int, ...], shard_size: int) -> None:
    """Refuse sizes that cannot make a store."""
    if int(n_samples) < 1:
        raise StoreError(f"a store needs at least one sample, got n_samples={n_samples}")
    if len(sample_shape) < 1 or any(int(d) < 1 for d in sample_shape):
        raise StoreError(f"sample_shape must have at least one axis, all >= 1; got {sample_shape}")
    if int(shard_size) < 1:
        raise StoreError(f"shard_size must be >= 1, got {shard_size}")


def not_a_store_message(url: str, kind: str) -> str:
    """Why ``url`` cannot be opened as a store."""
    if kind == "absent":
        return f"no pflatents store at {url} (nothing there)"
    if kind == "incomplete":
        return (f"{url} is an incomplete pflatents store (its creation was interrupted)\n"
                f"run extract again to re-create it")
    return f"{url} exists and is not a pflatents store (no zarr group with '{ATTR}' attributes)"


def build(loc: Location, meta: dict[str, Any], incomplete: bool, sample_ids: bool = False,
          labels: bool = False) -> zarr.Group:
    """Build the store layout; the ``pflatents`` attrs are written last, marking it complete.

    ``sample_ids`` / ``labels``: also make the per-sample ``sample_id`` (variable-length UTF-8
    string) and ``label`` (int64, -1 where unknown) arrays, chunked like the latents."""
    if loc.local is not None:
        loc.local.mkdir(parents=True, exist_ok=True)
    marker = {INCOMPLETE_ATTR: {"started": now(), "host": socket.gethostname(),
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
    create_status_array(root, n, size)
    if sample_ids:
        root.create_array("sample_id", shape=(n,), chunks=(size,), dtype=str,
                          compressors=ZstdCodec(level=3), dimension_names=("sample",), overwrite=True)
    if labels:
        root.create_array("label", shape=(n,), chunks=(size,), dtype="int64",
                          compressors=ZstdCodec(level=3), fill_value=-1,
                          dimension_names=("sample",), overwrite=True)
    coords = [name for name, keep in (("sample_id", sample_ids), ("label", labels)) if keep]
    if coords:  # xarray (CF decoding) opens these as coordinates of the latents' sample dimension
        root["latents"].attrs["coordinates"] = " ".join(coords)
    root.create_group("shards", overwrite=True)
    if "lock" not in root:
        root.create_group("lock")
    root.attrs.put({ATTR: meta})
    return root


def create_status_array(root: zarr.Group, n: int, shard_size: int) -> zarr.Array:
    """The per-sample status array (int8, 0 = ok), chunked like the shards."""
    return root.create_array("status", shape=(n,), chunks=(shard_size,), dtype="int8",
                             compressors=ZstdCodec(level=3), fill_value=0,
                             dimension_names=("sample",), overwrite=True)
