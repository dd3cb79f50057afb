"""``wds:PATTERN``: webdataset tar shards, read shard by shard without unpacking anything to disk.

``PATTERN`` is a brace pattern (``data/shard-{000000..000099}.tar``, ``{a,b}.tar``) of local paths or
fsspec URLs (``s3://...``, ``https://...``), expanded in order as webdataset does (``braceexpand``).
Samples are grouped as webdataset groups them (``webdataset.tariterators``): consecutive members whose
names share the part before the first dot of the file name (the ``__key__``) form one sample, keyed by
the rest of the name (the extension, lower-cased); ``__...__`` members are metadata and skipped.
The ``__key__`` is the sample id.

Random access: opening the source reads each shard's member headers once (tarfile; a seek past each
member's data) into a per-shard index of (key, member offsets and sizes); reading samples [i, j) seeks
to their image members in the shards that hold them. Compressed shards (``.tar.gz`` etc.) are read as a
stream, decompressed in memory up to the members wanted. Labels (the ``cls`` member, an integer as
text, webdataset's convention; ``label_key`` chooses another, ``""`` none) are read while indexing; a
sample without one is labelled -1. The image member is ``image_key`` (default: the first of png, jpg, jpeg, webp that
the first sample holds).
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import re
import tarfile
from dataclasses import dataclass, field
from typing import IO, Any, Optional

import numpy as np

from pflatents.tasks.data.images import EncodedImageSource
from pflatents.tasks.errors import DataError

__all__ = ["TarShardSource", "expand_pattern", "IMAGE_KEYS"]

IMAGE_KEYS = ("png", "jpg", "jpeg", "webp")
META = re.compile(r"__[^/]*__($|/)")
KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext


def expand_pattern(pattern: str) -> list[str]:
    """The shard URLs of a brace pattern, in order."""
    from braceexpand import braceexpand

    try:
        urls = list(braceexpand(pattern))
    except Exception as exc:  # noqa: BLE001 - braceexpand raises plain errors on bad patterns
        raise DataError(f"{pattern!r} is not a valid brace pattern of tar shards ({exc})") from exc
    return urls


def _open(url: str) -> IO[bytes]:
    if "://" in url:
        import fsspec

        return fsspec.open(url, "rb").open()
    return open(url, "rb")


def _decompressor(f: IO[bytes]) -> Optional[Any]:
    """A decompressing reader over ``f`` if the shard is compressed (by its magic bytes), else None."""
    head = f.read(6)
    f.seek(0)
    if head[:2] == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=f)
    if head[:3] == b"BZh":
        return bz2.BZ2File(f)
    if head == b"\xfd7zXZ\x00":
        return lzma.LZMAFile(f)
    return None


@dataclass
class _Shard:
    url: str
    keys: list[str] = field(default_factory=list)
    members: list[dict[str, tuple[int, int]]] = field(default_factory=list)  # ext -> (offset, size)
    labels: list[Optional[bytes]] = field(default_factory=list)
    compressed: bool = False


def _index_shard(url: str, label_key: Optional[str]) -> _Shard:
    """Read a shard's member headers (and its small label members) into an index."""
    shard = _Shard(url)
    try:
        with _open(url) as raw:
            stream = _decompressor(raw)
            shard.compressed = stream is not None
            with tarfile.open(fileobj=stream or raw, mode="r:") as tf:
                current: Optional[str] = None
                for m in tf:
                    if not m.isreg() or META.match(m.name) or ("/" not in m.name and m.name.startswith("__")):
                        continue
                    match = KEY_EXT.match(m.name)
                    if not match:
                        continue
                    key, ext = match.group(1), match.group(2).lower()
                    if key != current:
                        current = key
                        shard.keys.append(key)
                        shard.members.append({})
                        shard.labels.append(None)
                    if ext in shard.members[-1]:
                        raise DataError(f"tar shard {url}: sample {key} holds two '{ext}' members")
                    shard.members[-1][ext] = (m.offset_data, m.size)
                    if label_key is not None and ext == label_key:
                        shard.labels[-1] = tf.extractfile(m).read()  # type: ignore[union-attr]
    except FileNotFoundError as exc:
        raise DataError(f"webdataset shard not found: {url}") from exc
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise DataError(f"cannot read {url} as a tar shard: {type(exc).__name__}: {exc}") from exc
    return shard


class TarShardSource(EncodedImageSource):
    """webdataset tar shards as a random-access source (see the module docstring)."""

    kind = "wds"

    def __init__(self, spec: str, pattern: str, *, image_key: Optional[str] = None,
                 label_key: Optional[str] = "cls", **options: Any) -> None:
        self.spec, self.pattern = spec, pattern
        label_key = label_key or None  # "" : no labels
        self.urls = expand_pattern(pattern)
        if not self.urls:
            raise DataError(f"{spec}: the pattern names no shards")
        self.shards = [_index_shard(u, label_key) for u in self.urls]
        counts = np.array([len(s.keys) for s in self.shards], dtype=np.int64)
        if counts.sum() == 0:
            raise DataError(f"{spec}: the {len(self.urls)} shard(s) hold no samples")
        self._ends = np.cumsum(counts)
        first = next(s.members[0] for s in self.shards if s.keys)
        if image_key is None:
            image_key = next((k for k in IMAGE_KEYS if k in first), None)
            if image_key is None:
                raise DataError(f"{spec}: the first sample holds no image member ({', '.join(IMAGE_KEYS)}); "
                                f"it holds {', '.join(sorted(first)) or 'nothing'}: choose one with --image-key")
        self.image_key = image_key.lower().lstrip(".")
        self.label_key = label_key
        self._label_array = self._parse_labels()
        self._setup(**options)

    def _parse_labels(self) -> Optional[np.ndarray]:
        raw = [b for s in self.shards for b in s.labels]
        if self.label_key is None or all(b is None for b in raw):
            return None
        out = np.full(len(raw), -1, dtype=np.int64)
        keys = [k for s in self.shards for k in s.keys]
        for i, b in enumerate(raw):
            if b is None:
                continue
            try:
                out[i] = int(b.decode().strip())
            except (UnicodeDecodeError, ValueError):
                raise DataError(f"{self.spec}: the '{self.label_key}' member of sample {keys[i]} is "
                                f"{b[:40]!r}, not an integer class label") from None
        return out

    def _locate(self, item: int) -> tuple[int, int]:
        k = int(np.searchsorted(self._ends, item, side="right"))
        return k, item - (int(self._ends[k - 1]) if k else 0)

    def _n_items(self) -> int:
        return int(self._ends[-1])

    def _item_ids(self, items: np.ndarray) -> list[str]:
        out = []
        for i in items:
            k, j = self._locate(int(i))
            out.append(self.shards[k].keys[j])
        return out

    def _item_bytes(self, items: np.ndarray) -> list[bytes]:
        """Image members of ``items``, one open per shard; a missing member raises KeyError."""
        by_shard: dict[int, list[tuple[int, int]]] = {}
        for pos, i in enumerate(items):
            k, j = self._locate(int(i))
            by_shard.setdefault(k, []).append((pos, j))
        out: list[Any] = [None] * len(items)
        for k, wanted in by_shard.items():
            shard = self.shards[k]
            spans = []
            for pos, j in wanted:
                member = shard.members[j].get(self.image_key)
                if member is None:
                    raise KeyError(f"sample {shard.keys[j]} of {shard.url} has no '{self.image_key}' member "
                                   f"(it holds {', '.join(sorted(shard.members[j]))})")
                spans.append((member[0], member[1], pos))
            with _open(shard.url) as raw:
                stream = _decompressor(raw) if shard.compressed else None
                f = stream or raw
                for offset, size, pos in sorted(spans):
                    f.seek(offset)
                    out[pos] = f.read(size)
        return out

    def _kind_options(self) -> dict[str, Any]:
        return {"image_key": self.image_key, "label_key": self.label_key if self.has_labels else ""}

    def _item_identity(self, n_items: int) -> list[Any]:
        """Each shard's file name and the byte size of every image member of the first ``n_items`` samples."""
        sizes, urls = [], []
        for i in range(n_items):
            k, j = self._locate(i)
            if not urls or urls[-1] != self.urls[k]:
                urls.append(self.urls[k].rsplit("/", 1)[-1])
            sizes.append(self.shards[k].members[j].get(self.image_key, (0, -1))[1])
        return [urls, sizes]
