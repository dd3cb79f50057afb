"""The data source kinds, in one table: ``SOURCE_KINDS = {name: SourceKind}``.

A data spec names its kind by a prefix (``images:DIR``, ``npydir:DIR``, ``sklearn:digits``) or, for
the path kinds, by its path (``file.npy``, ``store.zarr[/array]``). Everything that depends on the
kind (opening the source, making its local path absolute, the file whose stat says it changed,
whether it grows, whether its samples are quantised pixels) is read from its ``SourceKind`` here;
no other module branches on a data prefix (tests/test_layering.py checks it).

Adding a source kind: one module with its ``Source`` subclass (``pflatents.tasks.data.sources``
documents the contract: ``__len__``, ``_read``, ``fingerprint``) and one line in ``SOURCE_KINDS``
(docs/extending.md).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

from pflatents.tasks.errors import DataError

if TYPE_CHECKING:
    from pflatents.tasks.data.sources import Source

__all__ = ["SourceKind", "SOURCE_KINDS", "source_kind", "open_source", "absolute_spec", "stat_path",
           "is_pixel_data", "specs_help"]

PREFIX = re.compile(r"^([A-Za-z][\w+.-]*):(?!//)")


@dataclass(frozen=True)
class SourceKind:
    """One kind of data source.

    - ``open(spec, rest)``: the ``Source`` for a spec (``rest`` is the spec after ``name:`` for a
      prefixed kind, the whole spec for a path kind).
    - ``usage``: how the spec is written (help texts and error messages).
    - ``prefixed``: the spec starts with ``name:``; otherwise the kind is recognised by ``claims``.
    - ``path(rest)``: the local file or directory the spec names (made absolute so a resume from
      another directory finds it, and stat'ed to notice a changed source), or None (bundled data).
    - ``growing``: the data may grow between runs (always extracted incrementally).
    - ``pixels``: samples are quantised pixels shown as images by the analysis.
    - ``options``: the keyword options ``open`` takes (``open(spec, rest, **options)``), each a job
      setting and flag of the same name (``resolution`` -> ``--resolution``); pinned with the spec.
    """

    name: str
    open: Callable[..., "Source"]
    usage: str
    prefixed: bool = True
    claims: Optional[Callable[[str], bool]] = None
    path: Callable[[str], Optional[str]] = lambda rest: rest
    growing: bool = False
    pixels: bool = False
    options: tuple[str, ...] = ()


def _open_images(spec: str, rest: str) -> "Source":
    from pflatents.tasks.data.sources import ImageSource

    return ImageSource(spec, rest)


def _open_npydir(spec: str, rest: str) -> "Source":
    from pflatents.tasks.data.sources import NpyDirSource

    return NpyDirSource(spec, rest)


def _open_sklearn(spec: str, rest: str) -> "Source":
    from pflatents.tasks.data.sources import DigitsSource

    if rest != "digits":
        raise DataError(f"unknown scikit-learn dataset {spec!r}; only sklearn:digits is bundled")
    return DigitsSource(spec)


IMAGE_OPTIONS = ("resolution", "channels", "interpolation", "skip_bad", "skipped")


def _open_imagefolder(spec: str, rest: str, **options: Any) -> "Source":
    from pflatents.tasks.data.imagefolder import ImageFolderSource

    return ImageFolderSource(spec, rest, **options)


def _open_wds(spec: str, rest: str, **options: Any) -> "Source":
    from pflatents.tasks.data.wds import TarShardSource

    return TarShardSource(spec, rest, **options)


def _open_parquet(spec: str, rest: str, **options: Any) -> "Source":
    from pflatents.tasks.data.parquet import ParquetSource

    return ParquetSource(spec, rest, **options)


def _zarr_parts(spec: str) -> Optional[tuple[str, str]]:
    """``(store root, inner path)`` if a path component ends in ``.zarr``, or a zarr directory."""
    parts = spec.rstrip("/").split("/")
    for i, part in enumerate(parts):
        if part.endswith(".zarr") and len(part) > len(".zarr"):
            return "/".join(parts[: i + 1]), "/".join(parts[i + 1:])
    p = Path(spec)
    if not spec.endswith(".npy") and p.is_dir() and any((p / n).is_file() for n in ("zarr.json", ".zgroup", ".zarray")):
        return spec, ""
    return None


def _open_zarr(spec: str, rest: str) -> "Source":
    from pflatents.tasks.data.sources import ZarrSource

    root, inner = _zarr_parts(spec)  # type: ignore[misc]  (claimed: not None)
    return ZarrSource(spec, root, inner)


def _zarr_path(spec: str) -> Optional[str]:
    if "://" in spec:
        return None
    root, sep, inner = spec.partition(".zarr/")
    return root + ".zarr" if sep else spec


def _open_npy(spec: str, rest: str) -> "Source":
    from pflatents.tasks.data.sources import NpySource

    return NpySource(spec)


# name -> kind; prefixed kinds are written ``name:...``; the path kinds are tried in this order
SOURCE_KINDS: dict[str, SourceKind] = {
    "images": SourceKind("images", _open_images, "images:DIR", pixels=True),
    "npydir": SourceKind("npydir", _open_npydir, "npydir:DIR", growing=True),
    "sklearn": SourceKind("sklearn", _open_sklearn, "sklearn:digits", path=lambda rest: None, pixels=True),
    "zarr": SourceKind("zarr", _open_zarr, "store.zarr[/array]", prefixed=False,
                       claims=lambda s: _zarr_parts(s) is not None, path=_zarr_path),
    "imagefolder": SourceKind("imagefolder", _open_imagefolder, "imagefolder:DIR", pixels=True, options=IMAGE_OPTIONS),
    "wds": SourceKind("wds", _open_wds, "wds:PATTERN", pixels=True, options=("image_key", "label_key", *IMAGE_OPTIONS),
                      path=lambda rest: None if "://" in rest or rest.startswith("{") else rest),
    "parquet": SourceKind("parquet", _open_parquet, "parquet:PATH", pixels=True,
                          options=("image_column", "label_column", "id_column", *IMAGE_OPTIONS)),
    "npy": SourceKind("npy", _open_npy, "file.npy", prefixed=False, claims=lambda s: s.endswith(".npy"),
                      path=lambda s: None if "://" in s else s),
}


def specs_help() -> str:
    """``a | b | c``: every way of writing a data spec."""
    order = sorted(SOURCE_KINDS.values(), key=lambda k: (k.prefixed, k.name != "npy"))
    return " | ".join(k.usage for k in order)


def source_kind(spec: str | os.PathLike[str]) -> tuple[SourceKind, str]:
    """The kind of a data spec and the rest of the spec after its prefix (the whole spec for path kinds)."""
    text = os.fspath(spec)
    m = PREFIX.match(text)
    if m and m.group(1) in SOURCE_KINDS and SOURCE_KINDS[m.group(1)].prefixed:
        return SOURCE_KINDS[m.group(1)], text[m.end():]
    if m and not Path(text).exists():
        raise DataError(f"unknown data source prefix '{m.group(1)}:' in {text!r}; expected {specs_help()}")
    for kind in SOURCE_KINDS.values():
        if not kind.prefixed and kind.claims is not None and kind.claims(text):
            return kind, text
    raise DataError(f"cannot tell what kind of data {text!r} is; expected {specs_help()}")


def open_source(spec: str | os.PathLike[str], **options: Any) -> "Source":
    """Open a dataset source from its spec (``pflatents.tasks.data.sources`` documents the kinds) with
    the options its kind takes (options left None are not given).

    Raises:
        DataError: unknown spec, missing/unreadable file, empty data, non-float dtype, an option the
            kind does not take.
    """
    text = os.fspath(spec)
    kind, rest = source_kind(text)
    given = {k: v for k, v in options.items() if v is not None}
    foreign = sorted(k for k, v in given.items() if k not in kind.options and v is not False)
    if foreign:
        takers = sorted(k.usage for k in SOURCE_KINDS.values() if set(foreign) & set(k.options))
        raise DataError(f"{text}: --{', --'.join(f.replace('_', '-') for f in foreign)} "
                        f"do{'es' if len(foreign) == 1 else ''} not apply to {kind.usage} data"
                        + (f" (only to {', '.join(takers)})" if takers else ""))
    return kind.open(text, rest, **{k: v for k, v in given.items() if k in kind.options})


def absolute_spec(spec: str) -> str:
    """The spec with its local path made absolute (so a resume from another directory finds the data)."""
    if "://" in spec:
        return spec
    try:
        kind, rest = source_kind(spec)
    except DataError:
        return str(Path(spec).expanduser().resolve())  # opening it names the problem
    path = kind.path(rest)
    if path is None:
        return spec
    absolute = str(Path(path).expanduser().resolve())
    if kind.prefixed:
        return f"{kind.name}:{absolute}"
    return absolute + spec[len(path):]


def is_pixel_data(spec: str) -> bool:
    """True when the spec's kind holds quantised pixels (the analysis shows its samples as images)."""
    try:
        return source_kind(spec)[0].pixels
    except DataError:
        return False


def stat_path(spec: str) -> Optional[str]:
    """The local file or directory whose stat tells whether the source changed; None if it has none."""
    try:
        kind, rest = source_kind(spec)
    except DataError:
        return None
    return kind.path(rest)
