"""Dataset sources: read any sample range of a dataset without loading the rest.

Specs accepted by :func:`open_source`:

- ``path/file.npy``: memory-mapped float array ``(N, *sample_shape)``.
- ``npydir:DIR``: every ``*.npy`` file in DIR (sorted by name, hidden files skipped), each
  memory-mapped, concatenated along the sample axis; a growing dataset appends new files (write
  them under a name not ending in ``.npy``, or a hidden one, and rename them into place).
- ``path/store.zarr`` or ``path/store.zarr/inner/array``: a float Zarr array (v2 or v3).
- ``images:DIR``: 8-bit PNG/JPEG files of one size, sorted by name, as CHW float32 in [-1, 1].
- ``sklearn:digits``: the 1797 8x8 digits bundled with scikit-learn, flat 64, float32 in [-1, 1].

Every source reads ``read(start, stop) -> Batch(x, ids, labels)``: the samples, one string id per
sample (the row index for arrays, the file name for ``images:``) and the class labels where the
format has them (``sklearn:digits``: the digit 0-9; else None). Sources of encoded images (image
folders, webdataset tar shards, parquet / Hugging Face datasets) live in
``pflatents.tasks.data.images`` and its neighbours; ``open_source(spec, **options)`` opens any kind.

Pure numpy: zarr, Pillow and scikit-learn are imported only by the sources that need them.
Quantised sources (``quantization = q``) hold exactly the values ``-1 + 2 k / (q - 1)``,
``k = 0 .. q-1`` (q = 256 for 8-bit images, 17 for digits); float sources have ``None``.
"""

from __future__ import annotations

import hashlib
import json
import operator
import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import numpy as np

from pflatents.tasks.core import Batch
from pflatents.tasks.errors import DataError

__all__ = ["Batch", "Source", "ArraySource", "NpySource", "ZarrSource", "ImageSource", "DigitsSource",
           "open_source", "open_pinned"]

MiB = 1 << 20
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
GRAY_MODES = {"1", "L", "LA"}
RGB_MODES = {"RGB", "RGBA", "RGBX", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV"}


class Source(ABC):
    """A dataset of ``len(source)`` samples of ``sample_shape``, read by index range."""

    spec: str
    sample_shape: tuple[int, ...]
    dtype: np.dtype[Any]
    quantization: int | None = None
    hash_full_bytes: int = 64 * MiB   # hash every sample below this total size ...
    hash_block_bytes: int = 4 * MiB   # ... else this many bytes at each of
    hash_blocks: int = 9              # this many evenly spaced places (first, middle, last incl.)

    @abstractmethod
    def __len__(self) -> int:
        """Number of samples N."""

    @abstractmethod
    def _read(self, start: int, stop: int) -> np.ndarray:
        """Samples ``[start, stop)`` (range already checked)."""

    def _ids(self, start: int, stop: int) -> np.ndarray:
        """Sample ids of ``[start, stop)`` (range checked): the row index as text unless overridden."""
        return np.arange(start, stop).astype(str)

    def _labels(self, start: int, stop: int) -> np.ndarray | None:
        """Class labels (int64) of ``[start, stop)``, or None when the source has none."""
        return None

    @property
    def has_labels(self) -> bool:
        """True when ``read`` returns class labels."""
        return False

    @property
    def options(self) -> dict[str, Any]:
        """Keyword options that, with ``spec``, reopen this very source (``open_source(spec, **options)``);
        JSON, pinned in the store. Empty for the kinds that take none."""
        return {}

    def pinned(self) -> dict[str, Any]:
        """What the store pins about this source besides its spec, fingerprint, length and shape: its
        ``options`` and, for labelled sources, the class names (``classes``). Empty for the kinds that
        take no options (so stores of those kinds keep the config they had)."""
        return {"options": self.options} if self.options else {}

    def _identity(self, n: int) -> list[Any]:
        """Cheap facts about the first ``n`` samples hashed into the fingerprint besides values."""
        return []

    def ids(self, start: int, stop: int) -> np.ndarray:
        """Sample ids of ``[start, stop)`` (strings) without decoding the samples."""
        start, stop = self._check_range(start, stop)
        return self._ids(start, stop)

    def labels(self, start: int, stop: int) -> np.ndarray | None:
        """Class labels (int64) of ``[start, stop)`` without decoding the samples, or None."""
        start, stop = self._check_range(start, stop)
        return self._labels(start, stop)

    def _ids_labels_digest(self, n: int, block: int = 65536) -> str:
        """blake2b of the ids and labels of the first ``n`` samples (kinds whose ids are not their row
        index put it in ``_identity``, so the fingerprint covers them)."""
        h = hashlib.blake2b(digest_size=20)
        for i0 in range(0, n, block):
            i1 = min(n, i0 + block)
            for sid in self._ids(i0, i1):
                b = str(sid).encode()
                h.update(len(b).to_bytes(4, "little") + b)
            labels = self._labels(i0, i1)
            if labels is not None:
                h.update(np.ascontiguousarray(labels, dtype="<i8").tobytes())
        return h.hexdigest()

    @property
    def sample_nbytes(self) -> int:
        """Bytes of one sample as returned by ``read``."""
        return int(np.prod(self.sample_shape, dtype=np.int64)) * self.dtype.itemsize

    def _check_range(self, start: int, stop: int) -> tuple[int, int]:
        start, stop, n = operator.index(start), operator.index(stop), len(self)
        if not 0 <= start <= stop <= n:
            raise DataError(f"{self.spec}: cannot read samples [{start}, {stop}): the source has "
                            f"{n} samples (need 0 <= start <= stop <= {n})")
        return start, stop

    def read(self, start: int, stop: int) -> Batch:
        """Samples ``[start, stop)``: ``x`` a C-contiguous array ``(stop - start, *sample_shape)``, their
        ids (strings) and class labels (int64, or None)."""
        start, stop = self._check_range(start, stop)
        return Batch(self._read(start, stop), self._ids(start, stop), self._labels(start, stop))

    def fingerprint(self, n: int | None = None) -> str:
        """blake2b of shape, dtype and the values read (all, or sampled blocks if large).

        ``n`` fingerprints only the first ``n`` samples (the extracted prefix of a growing
        source): a source that grew has the same ``fingerprint(n)`` as before it grew.

        Array sources hash content only (the same values as .npy or .zarr hash alike); image
        sources also hash every file's name and byte size, which catches most edits between
        sampled blocks at the cost of one stat per file.
        """
        n = len(self) if n is None else operator.index(n)
        if not 0 <= n <= len(self):
            raise DataError(f"{self.spec}: cannot fingerprint the first {n} samples of "
                            f"{len(self)}")
        h = hashlib.blake2b(digest_size=20)
        header = [n, list(self.sample_shape), self.dtype.str, self.quantization,
                  *self._identity(n)]
        h.update(json.dumps(header).encode())
        for start, stop in self._hash_ranges(n):
            h.update(f"{start}:{stop};".encode())
            h.update(self.read(start, stop).x)
        return "blake2b:" + h.hexdigest()

    def _hash_ranges(self, n: int | None = None) -> list[tuple[int, int]]:
        """Ranges of the first ``n`` samples hashed by ``fingerprint``: all, or spaced blocks."""
        n = len(self) if n is None else n
        rows = max(1, self.hash_block_bytes // max(1, self.sample_nbytes))
        if n * self.sample_nbytes <= self.hash_full_bytes or n <= rows * self.hash_blocks:
            return [(i, min(n, i + rows)) for i in range(0, n, rows)]
        starts = np.unique(np.linspace(0, n - rows, self.hash_blocks).round().astype(np.int64))
        return [(int(s), int(s) + rows) for s in starts]

    def check_finite(self, block: int = 65536, start: int = 0) -> None:
        """Scan samples from ``start`` on in blocks; raise ``DataError`` naming NaN/Inf samples."""
        if self.quantization is not None:
            return  # integer pixels/counts scaled by a constant are always finite
        rows = max(1, min(block, 64 * MiB // max(1, self.sample_nbytes)))
        bad: list[int] = []
        total = 0
        for i0 in range(start, len(self), rows):
            x = self._read(i0, min(len(self), i0 + rows))
            idx = np.flatnonzero(~np.isfinite(x.reshape(len(x), -1)).all(axis=1)) + i0
            total += idx.size
            bad.extend(int(i) for i in idx[: max(0, 10 - len(bad))])
        if total:
            raise DataError(f"{self.spec}: NaN or Inf in {total} samples, first at indices "
                            f"{', '.join(map(str, bad))}\nremove or fix them before extracting")

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickle as the spec and options (a memory map must not travel as its whole contents)."""
        return (_reopen, (self.spec, self.options))

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.spec!r}, n={len(self)}, "
                f"sample_shape={self.sample_shape}, dtype={self.dtype})")


def _float_dtype(spec: str, dtype: np.dtype[Any]) -> np.dtype[Any]:
    """The dtype ``read`` returns for stored ``dtype``; refuse anything but floats."""
    if dtype.kind == "f" and dtype.itemsize <= 8:
        return np.dtype(np.float64 if dtype.itemsize == 8 else np.float32)
    if dtype.kind in "iub":
        raise DataError(f"{spec}: dtype {dtype} is not accepted: float data (float32/float64) are "
                        f"required\nintegers are accepted only where the source defines a scale, "
                        f"e.g. images:DIR (8-bit pixels mapped to [-1, 1])")
    raise DataError(f"{spec}: dtype {dtype} is not supported; float32 or float64 data required")


def _check_shape(spec: str, shape: tuple[int, ...]) -> None:
    """Refuse arrays with no sample axis, no samples or empty samples."""
    if len(shape) < 2:
        raise DataError(f"{spec}: shape {shape} has no sample axis; expected (n_samples, "
                        f"*sample_shape), e.g. reshape 1-D data to (N, 1)")
    if shape[0] == 0:
        raise DataError(f"{spec} is empty: shape {shape} holds no samples")
    if 0 in shape[1:]:
        raise DataError(f"{spec}: samples of shape {shape[1:]} hold no values")


class ArraySource(Source):
    """A source backed by an array-like indexable by sample range (memmap, zarr, ndarray)."""

    def __init__(self, spec: str, array: Any, identity: list[Any] | None = None,
                 quantization: int | None = None) -> None:
        shape = tuple(int(d) for d in array.shape)
        _check_shape(spec, shape)
        self.spec, self._array, self._ident = spec, array, list(identity or [])
        self.dtype = _float_dtype(spec, np.dtype(array.dtype))
        self.sample_shape, self.quantization = shape[1:], quantization

    def __len__(self) -> int:
        """Number of samples N."""
        return int(self._array.shape[0])

    def _read(self, start: int, stop: int) -> np.ndarray:
        """Copy samples ``[start, stop)`` into memory as native ``self.dtype``."""
        return np.array(self._array[start:stop], dtype=self.dtype, order="C")

    def _identity(self, n: int) -> list[Any]:
        """Source-specific facts given at construction."""
        return self._ident


class NpySource(ArraySource):
    """A ``.npy`` file, memory-mapped read-only (never loaded whole)."""

    def __init__(self, spec: str) -> None:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise DataError(f"data file not found: {path}")
        shape, dtype = _npy_header(path)
        _check_shape(spec, shape)
        _float_dtype(spec, dtype)
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise DataError(f"cannot memory-map {path}: {exc}") from exc
        super().__init__(spec, array)


def _npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype[Any]]:
    """Shape and dtype of a ``.npy`` file, read without touching the data."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(f)
            else:
                shape, _, dtype = np.lib.format.read_array_header_2_0(f)
            return tuple(shape), np.dtype(dtype)
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(f"cannot read {path} as a .npy file: {exc}") from exc


class NpyDirSource(Source):
    """``*.npy`` files in a directory, sorted by name, concatenated along the sample axis.

    Each file is memory-mapped; all must hold float samples of one shape. Content-only
    fingerprint (like ``NpySource``), so ``fingerprint(n)`` does not depend on how the first
    ``n`` samples are split into files.
    """

    def __init__(self, spec: str, directory: str) -> None:
        root = Path(directory).expanduser()
        if not root.is_dir():
            raise DataError(f"npy directory not found: {root}")
        self.files = sorted((p for p in root.iterdir() if p.suffix == ".npy"
                             and not p.name.startswith(".") and p.is_file()), key=lambda p: p.name)
        if not self.files:
            raise DataError(f"no .npy files in {root}")
        self.spec, self._arrays = spec, [NpySource(str(p))._array for p in self.files]
        first = self._arrays[0]
        self.sample_shape, self.dtype = tuple(int(d) for d in first.shape[1:]), _float_dtype(
            spec, np.dtype(first.dtype))
        for path, a in zip(self.files, self._arrays):
            if tuple(a.shape[1:]) != self.sample_shape or _float_dtype(spec, a.dtype) != self.dtype:
                raise DataError(f"{path} holds samples of shape {tuple(a.shape[1:])} and dtype "
                                f"{a.dtype}, but {self.files[0].name} holds {self.sample_shape}, "
                                f"{first.dtype}; all files in {root} must match")
        self._ends = np.cumsum([len(a) for a in self._arrays])

    def __len__(self) -> int:
        """Total samples over all files."""
        return int(self._ends[-1])

    def _read(self, start: int, stop: int) -> np.ndarray:
        """Copy samples ``[start, stop)``, spanning files where needed."""
        out = np.empty((stop - start, *self.sample_shape), dtype=self.dtype)
        first = int(np.searchsorted(self._ends, start, side="right"))
        pos = start
        for k in range(first, len(self._arrays)):
            if pos >= stop:
                break
            f0 = int(self._ends[k]) - len(self._arrays[k])
            take = min(stop, int(self._ends[k])) - pos
            out[pos - start: pos - start + take] = self._arrays[k][pos - f0: pos - f0 + take]
            pos += take
        return out


class ZarrSource(ArraySource):
    """A float array in a Zarr store: ``store.zarr`` or ``store.zarr/inner/path``."""

    def __init__(self, spec: str, root: str, inner: str) -> None:
        import zarr

        if "://" not in root and not Path(root).expanduser().exists():
            raise DataError(f"zarr store not found: {root}")
        try:
            node = zarr.open(str(Path(root).expanduser()) if "://" not in root else root,
                             mode="r")
        except Exception as exc:  # zarr raises several types for unreadable stores
            raise DataError(f"cannot open {root} as a zarr store: {exc}") from exc
        array = _zarr_array(spec, root, inner, node)
        super().__init__(spec, array)


def _zarr_array(spec: str, root: str, inner: str, node: Any) -> Any:
    """The array at ``inner`` under ``node``, or a DataError naming the arrays there."""
    import zarr

    if inner:
        if not isinstance(node, zarr.Group) or inner not in node:
            raise DataError(f"{spec}: no array '{inner}' in zarr store {root}")
        node = node[inner]
    if isinstance(node, zarr.Group):
        names = sorted(p for p, m in node.members(max_depth=None) if isinstance(m, zarr.Array))
        base = spec.rstrip("/")
        hint = f"name one: {', '.join(f'{base}/{n}' for n in names[:10])}" if names else (
            "it holds no arrays")
        raise DataError(f"{spec} is a zarr group, not an array; {hint}")
    return node


class ImageSource(Source):
    """8-bit PNG/JPEG images of one size in a directory, as CHW float32 in [-1, 1]."""

    quantization = 256

    def __init__(self, spec: str, directory: str) -> None:
        root = Path(directory).expanduser()
        if not root.is_dir():
            raise DataError(f"image directory not found: {root}")
        self.files = sorted((p for p in root.iterdir()
                             if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()),
                            key=lambda p: p.name)
        if not self.files:
            raise DataError(f"no PNG/JPEG images in {root}")
        self.spec, self.dtype = spec, np.dtype(np.float32)
        (w, h), channels = _probe(self.files[0])
        self.size, self.mode = (w, h), "L" if channels == 1 else "RGB"
        self.sample_shape = (channels, h, w)
        for path in self.files[1:]:
            self._check_image(path, *_probe(path))

    def __len__(self) -> int:
        """Number of images."""
        return len(self.files)

    def _check_image(self, path: Path, size: tuple[int, int], channels: int) -> None:
        """Refuse an image whose size or channel count differs from the first image's."""
        first = self.files[0].name
        if size != self.size:
            raise DataError(f"{path} is {size[0]}x{size[1]} pixels, but {first} (and the images "
                            f"before it) are {self.size[0]}x{self.size[1]}; all images must "
                            f"have one size")
        if channels != self.sample_shape[0]:
            raise DataError(f"{path} has {channels} channel(s), but {first} has "
                            f"{self.sample_shape[0]}; use all grayscale or all RGB images")

    def _read(self, start: int, stop: int) -> np.ndarray:
        """Decode images ``[start, stop)`` to CHW float32 ``k / 127.5 - 1``."""
        from PIL import Image

        out = np.empty((stop - start, *self.sample_shape), dtype=np.float32)
        for i, path in enumerate(self.files[start:stop]):
            with Image.open(path) as im:
                self._check_image(path, im.size, _channels(path, im.mode))
                pixels = np.asarray(im.convert(self.mode), dtype=np.uint8)
            pixels = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
            out[i] = pixels.astype(np.float32) / np.float32(127.5) - np.float32(1)
        return out

    def _ids(self, start: int, stop: int) -> np.ndarray:
        """The file names (already in the fingerprint's identity)."""
        return np.array([p.name for p in self.files[start:stop]], dtype=str)

    def _identity(self, n: int) -> list[Any]:
        """Names and byte sizes of the first ``n`` image files (cheap: one stat each)."""
        return ["images", [[p.name, p.stat().st_size] for p in self.files[:n]]]


def _channels(path: Path, mode: str) -> int:
    """Channels an 8-bit image mode maps to (1 gray, 3 RGB; alpha dropped)."""
    if mode in GRAY_MODES:
        return 1
    if mode in RGB_MODES:
        return 3
    raise DataError(f"{path} has pixel mode {mode}; only 8-bit grayscale or RGB(A) images "
                    f"are supported")


def _probe(path: Path) -> tuple[tuple[int, int], int]:
    """(width, height) and channel count of an image, from its header only."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return im.size, _channels(path, im.mode)
    except (OSError, UnidentifiedImageError) as exc:
        raise DataError(f"cannot read image {path}: {exc}") from exc


class DigitsSource(ArraySource):
    """scikit-learn's bundled 8x8 digits: 1797 x 64, values 0..16 scaled to ``x / 8 - 1``."""

    def __init__(self, spec: str) -> None:
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = digits.data.astype(np.float32) / np.float32(8) - np.float32(1)
        super().__init__(spec, x, quantization=17)
        self._target = np.asarray(digits.target, dtype=np.int64)

    @property
    def has_labels(self) -> bool:
        return True

    def _labels(self, start: int, stop: int) -> np.ndarray:
        """The digit shown (0-9). Bundled with the values: the fingerprint keeps hashing values only
        (as before labels were read), so stores made then keep their fingerprint."""
        return self._target[start:stop].copy()


def open_source(spec: str | os.PathLike[str], **options: Any) -> Source:
    """Open a dataset source from its spec (the kinds: ``pflatents.tasks.data.registry.SOURCE_KINDS``);
    ``options`` are the keyword options of the kinds that take some (``resolution``, ``skip_bad``, ...).

    Raises:
        DataError: unknown spec, missing/unreadable file, empty data, non-float dtype, options given
            to a kind that takes none.
    """
    from pflatents.tasks.data.registry import open_source as _open

    return _open(spec, **options)


def open_pinned(data: Any) -> Source:
    """The source a store's pinned data spec names (``DataSpec`` or its JSON), opened with its pinned options."""
    if isinstance(data, dict):
        return open_source(data["spec"], **(data.get("options") or {}))
    return open_source(data.spec, **(data.options or {}))


def _reopen(spec: str, options: dict[str, Any]) -> Source:
    return open_source(spec, **options)
