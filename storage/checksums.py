"""Shard checksums (CRC-32C of new records, BLAKE2b of older ones) and finiteness checks."""

from __future__ import annotations

import hashlib

import google_crc32c
import numpy as np

from pflatents.storage.errors import StoreError

__all__ = ["CHECKSUM_ALGORITHM", "checksum", "bad_rows", "first_indices"]

CHECKSUM_ALGORITHM = "crc32c"  # of new records; older "blake2b:" records still verify


def _le_bytes(a: np.ndarray, dtype: str) -> np.ndarray:
    """``a`` as a flat read-only little-endian byte view (no copy if it already is ``dtype``)."""
    v = np.ascontiguousarray(a, dtype=dtype).reshape(-1).view(np.uint8)
    v.flags.writeable = False  # google_crc32c takes read-only buffers only
    return v


def _ids_bytes(ids: np.ndarray) -> np.ndarray:
    """Sample ids as bytes: each id's UTF-8 length (uint32 LE) followed by its UTF-8 bytes."""
    out = bytearray()
    for sid in ids.tolist():
        b = str(sid).encode()
        out += len(b).to_bytes(4, "little") + b
    v = np.frombuffer(bytes(out), dtype=np.uint8)
    return v


def checksum(latents: np.ndarray, nfe: np.ndarray, algorithm: str = CHECKSUM_ALGORITHM,
             status: np.ndarray | None = None, ids: np.ndarray | None = None,
             labels: np.ndarray | None = None) -> str:
    """Checksum of a shard: its little-endian float32 latents bytes followed by its int32 NFE bytes,
    and by its int8 per-sample status bytes when any sample is flagged (so shards without flagged
    samples keep the checksum they had before the status existed), then, in stores that keep them,
    its sample ids (per id: uint32 LE UTF-8 length, UTF-8 bytes) and int64 LE labels.

    ``algorithm`` "crc32c" (CRC-32C, ~20 GB/s; the default, written as ``crc32c:<8 hex>``) or
    "blake2b" (160-bit, ~0.6 GB/s; what older records hold, written as ``blake2b:<40 hex>``).
    """
    parts = [_le_bytes(latents, "<f4"), _le_bytes(nfe, "<i4")]
    if status is not None and np.any(status):
        parts.append(_le_bytes(status, "i1"))
    if ids is not None:
        parts.append(_ids_bytes(np.asarray(ids)))
    if labels is not None:
        parts.append(_le_bytes(labels, "<i8"))
    if algorithm == "crc32c":
        value = google_crc32c.value(parts[0])
        for part in parts[1:]:
            value = google_crc32c.extend(value, part)
        return f"crc32c:{value:08x}"
    if algorithm == "blake2b":
        h = hashlib.blake2b(digest_size=20)
        for part in parts:
            h.update(part)
        return "blake2b:" + h.hexdigest()
    raise StoreError(f"unknown checksum algorithm {algorithm!r} (known: crc32c, blake2b)")


def bad_rows(x: np.ndarray) -> np.ndarray:
    """Indices of rows of ``x`` holding any NaN or Inf."""
    finite = np.isfinite(x)
    if finite.all():  # the common case, without the slower per-row reduction
        return np.empty(0, dtype=np.intp)
    return np.flatnonzero(~finite.reshape(len(x), -1).all(axis=1))


def first_indices(indices: np.ndarray, limit: int = 10) -> str:
    """The first ``limit`` indices as text, with the total when there are more."""
    head = ", ".join(str(int(i)) for i in indices[:limit])
    return head + (f" ... ({len(indices)} in all)" if len(indices) > limit else "")
