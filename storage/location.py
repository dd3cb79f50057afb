"""Where a store lives: a local directory or an fsspec URL, and the small JSON objects kept there.

Local paths are written with temp file + rename, so a reader sees a whole object or the old one;
on object stores each object is one PUT. Listings of remote folders are never cached: other
processes add shard records while a run goes on.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import zarr

from pflatents.storage.layout import ATTR, INCOMPLETE_ATTR
from pflatents.storage.lock import StoreLock, lock_for

__all__ = ["Location", "loads_json"]


@dataclass(frozen=True)
class Location:
    """Where a store lives: a local directory or an fsspec URL."""

    url: str
    local: Path | None
    storage_options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, url: str | os.PathLike[str], storage_options: dict[str, Any] | None = None
              ) -> Location:
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
            found = {k: loads_json(blobs.get(f"{root}/{k}")) for k in keys}
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
        if not fs.exists(root):
            return True
        return {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)} <= {"lock"}

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
        """The lock object of this store (a kernel lock on local disks, a lease elsewhere)."""
        if self.local is not None:
            return lock_for(self.local)
        fs, root = self.fs()
        return lock_for(None, fs=fs, root=root, url=self.url)


def loads_json(blob: bytes | None) -> dict[str, Any] | None:
    """Parse a JSON object from bytes; None if absent or malformed."""
    try:
        value = json.loads(blob) if blob else None
    except ValueError:
        return None
    return value if isinstance(value, dict) else None
