"""Plain-JSON conversion, canonical hashing and field diffs of the store's pinned config."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from pathlib import PurePath
from typing import Any

import numpy as np

from pflatents.storage.errors import StoreError

__all__ = ["to_json", "config_hash", "config_diff", "format_diff"]


def to_json(value: Any, where: str = "config", nonfinite: str = "raise") -> Any:
    """Return ``value`` as plain JSON types (numpy scalars/arrays, tuples, paths converted).

    A NaN or infinite float raises StoreError (``nonfinite="raise"``, for configs and records) or
    becomes None (``nonfinite="null"``, for results such as an analysis summary)."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            if nonfinite == "null":
                return None
            raise StoreError(f"{where} is {value}: only finite numbers can be stored in attrs")
        return value
    if isinstance(value, np.generic):
        return to_json(value.item(), where, nonfinite)
    if isinstance(value, np.ndarray):
        return to_json(value.tolist(), where, nonfinite)
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): to_json(v, f"{where}.{k}", nonfinite) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json(v, f"{where}[{i}]", nonfinite) for i, v in enumerate(value)]
    raise StoreError(f"{where} has a {type(value).__name__} value, which is not plain JSON")


def canonical_json(config: Mapping[str, Any]) -> str:
    """Serialise ``config`` deterministically (sorted keys, no whitespace)."""
    return json.dumps(to_json(config), sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def config_hash(config: Mapping[str, Any]) -> str:
    """SHA-256 hex digest of the canonical JSON of ``config``."""
    return hashlib.sha256(canonical_json(config).encode("ascii")).hexdigest()


def config_diff(stored: Any, new: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """List ``(dotted_field, stored, new)`` for every leaf that differs between two JSON values."""
    if isinstance(stored, dict) and isinstance(new, dict):
        diffs: list[tuple[str, Any, Any]] = []
        for key in sorted(set(stored) | set(new)):
            field = f"{prefix}.{key}" if prefix else str(key)
            if key not in stored:
                diffs.append((field, "<absent>", new[key]))
            elif key not in new:
                diffs.append((field, stored[key], "<absent>"))
            else:
                diffs.extend(config_diff(stored[key], new[key], field))
        return diffs
    same = stored == new and type(stored) is type(new)
    return [] if same else [(prefix or "<config>", stored, new)]


def _short(value: Any, limit: int = 60) -> str:
    """Return a repr of ``value`` cut to ``limit`` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def format_diff(diffs: list[tuple[str, Any, Any]], limit: int = 8) -> str:
    """Render differences as ``field: stored X, new Y; ...`` (at most ``limit`` fields)."""
    parts = [f"{f}: stored {_short(s)}, new {_short(n)}" for f, s, n in diffs[:limit]]
    more = f"; and {len(diffs) - limit} more" if len(diffs) > limit else ""
    return "; ".join(parts) + more
