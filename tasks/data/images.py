"""Sources of encoded images (files in a folder, webdataset tar members, parquet / arrow cells).

``EncodedImageSource`` holds what the three kinds share: decoding, the transform of diffusers'
training scripts, the scan for unreadable images and the skip list, ids and labels, fingerprints. A
kind supplies its *items* (the encoded images, in a fixed order) through four methods: how many,
their ids, their labels and their bytes. Samples are the items less the skipped ones.

The transform (``resolution`` R): the image is converted to RGB (``channels`` 3, the default, as
diffusers' ``image.convert("RGB")``) or 8-bit grey (``channels`` 1, ``convert("L")``; 16-bit grey
keeps its top 8 bits), its short side resized to R (torchvision's ``Resize(R)`` on a PIL image: the
long side ``int(R * long / short)``, PIL's antialiased ``interpolation``, bilinear by default as in
diffusers' ``train_unconditional.py``), then centre-cropped to R x R (torchvision's ``CenterCrop``:
offsets ``round((size - R) / 2)``). Pixels ``k`` become ``k / 127.5 - 1`` (8-bit: ``quantization``
256), channels first. Without a resolution every image must have the first one's size.

Unreadable images: ``check_finite`` (run before anything is written) decodes every image and names
the ones it cannot read, or, opened with ``skip_bad``, the source decodes every image when opened and
leaves the unreadable ones out, listing them in ``skipped`` (ids and reasons); the list is pinned in
the store with the options, so workers reopen the same samples without scanning again.
"""

from __future__ import annotations

import io
import os
import re
import warnings
from abc import abstractmethod
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional, Sequence

import numpy as np

from pflatents.tasks.data.sources import Source
from pflatents.tasks.errors import DataError

__all__ = ["EncodedImageSource", "ImageTransform", "INTERPOLATIONS"]

INTERPOLATIONS = ("bilinear", "bicubic", "lanczos", "nearest")
SCAN_BLOCK = 256


def _reason(exc: BaseException) -> str:
    """Why an image cannot be read, without object addresses (the text is pinned with the skip list)."""
    return re.sub(r" ?<[^<>]* at 0x[0-9a-fA-F]+>", "", f"{type(exc).__name__}: {exc}")[:300]


class ImageTransform:
    """Encoded image bytes -> uint8 (C, H, W): mode conversion, optional resize + centre crop."""

    def __init__(self, channels: int = 3, resolution: Optional[int] = None,
                 interpolation: str = "bilinear") -> None:
        if channels not in (1, 3):
            raise DataError(f"channels must be 1 (grey) or 3 (RGB), got {channels!r}")
        if resolution is not None and (isinstance(resolution, bool) or int(resolution) < 1):
            raise DataError(f"resolution must be a positive number of pixels, got {resolution!r}")
        if interpolation not in INTERPOLATIONS:
            raise DataError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got {interpolation!r}")
        self.channels, self.interpolation = int(channels), interpolation
        self.resolution = None if resolution is None else int(resolution)

    def __call__(self, data: bytes) -> np.ndarray:
        """Decode and transform one image; raises whatever Pillow raises on a bad file."""
        from PIL import Image

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # palette transparency notes, EXIF oddities
            with Image.open(io.BytesIO(data)) as im:
                im.load()
                im = self._convert(im)
        if self.resolution is not None:
            im = self._resize_crop(im)
        a = np.asarray(im, dtype=np.uint8)
        return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)

    def _convert(self, im: Any) -> Any:
        from PIL import Image

        if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
            grey = Image.fromarray((np.clip(np.asarray(im, dtype=np.int64), 0, 65535) >> 8).astype(np.uint8))
            return grey if self.channels == 1 else grey.convert("RGB")
        if im.mode == "F":
            raise ValueError("floating-point images (mode F) are not supported: save 8- or 16-bit images")
        return im.convert("L" if self.channels == 1 else "RGB")

    def _resize_crop(self, im: Any) -> Any:
        from PIL import Image

        r = self.resolution
        w, h = im.size
        if w <= h:
            nw, nh = r, int(r * h / w)
        else:
            nw, nh = int(r * w / h), r
        if (nw, nh) != (w, h):
            im = im.resize((nw, nh), getattr(Image.Resampling, self.interpolation.upper()))
        left, top = int(round((nw - r) / 2.0)), int(round((nh - r) / 2.0))
        return im.crop((left, top, left + r, top + r)) if (nw, nh) != (r, r) else im


class EncodedImageSource(Source):
    """Encoded images with ids and optional labels, decoded on read to CHW float32 in [-1, 1].

    Subclasses set ``spec`` and ``kind``, find their items, then call ``_setup`` with the transform
    options; they implement ``_n_items``, ``_item_ids`` and ``_item_bytes`` (by item index arrays),
    set ``_label_array`` (one int64 label per item) when they have labels, and may add
    ``_item_identity`` (cheap facts, e.g. byte sizes) and ``_kind_options`` (their own options).
    """

    quantization = 256
    kind: str = "images"
    classes: Optional[list[str]] = None
    _label_array: Optional[np.ndarray] = None

    # ---- what a kind supplies ---------------------------------------------------------------

    @abstractmethod
    def _n_items(self) -> int:
        """Number of encoded images (skipped ones included)."""

    @abstractmethod
    def _item_ids(self, items: np.ndarray) -> list[str]:
        """Ids of the items at ``items`` (sorted item indices)."""

    def _item_labels(self, items: np.ndarray) -> Optional[np.ndarray]:
        """Labels (int64, -1 where an item has none) of ``items``, or None if the source has no labels
        (by default from ``_label_array``, one label per item, which a kind may set)."""
        return None if self._label_array is None else self._label_array[items]

    @abstractmethod
    def _item_bytes(self, items: np.ndarray) -> list[bytes]:
        """The encoded bytes of ``items``."""

    def _item_identity(self, n_items: int) -> list[Any]:
        """Cheap facts about the first ``n_items`` items for the fingerprint (besides ids and labels)."""
        return []

    def _kind_options(self) -> dict[str, Any]:
        """The kind's own options (column names, image key, ...), as passed to its constructor."""
        return {}

    # ---- set-up -----------------------------------------------------------------------------

    def _setup(self, *, resolution: Optional[int] = None, channels: Optional[int] = None,
               interpolation: Optional[str] = None, skip_bad: bool = False,
               skipped: Optional[Sequence[Any]] = None) -> None:
        self.dtype = np.dtype(np.float32)
        self.transform = ImageTransform(3 if channels is None else int(channels), resolution,
                                        interpolation or "bilinear")
        self.skip_bad = bool(skip_bad) or skipped is not None
        self._keep: Optional[np.ndarray] = None  # sample -> item index (None: all items)
        self._scanned = False
        if self._n_items() == 0:
            raise DataError(f"{self.spec}: no images found")
        if skipped is not None:
            self.skipped = [[str(s[0]), str(s[1])] if isinstance(s, (list, tuple)) else [str(s), ""]
                            for s in skipped]
            self._apply_skip({s[0] for s in self.skipped})
        elif self.skip_bad:
            self.skipped = []
            self._scan(0, raise_bad=False)
        else:
            self.skipped = []
        if len(self) == 0:
            raise DataError(f"{self.spec}: every image was skipped as unreadable ({len(self.skipped)})")
        if self.transform.resolution is not None:
            r = self.transform.resolution
            self.sample_shape = (self.transform.channels, r, r)
        else:
            first = self._decode_items(self._items(0, 1))[0]
            self.sample_shape = tuple(int(d) for d in first.shape)

    def _apply_skip(self, skip: set[str]) -> None:
        n = self._n_items()
        drop = [i for i0 in range(0, n, 65536)
                for i, sid in zip(range(i0, min(n, i0 + 65536)), self._item_ids(np.arange(i0, min(n, i0 + 65536))))
                if sid in skip]
        if drop:
            keep = np.ones(n, dtype=bool)
            keep[drop] = False
            self._keep = np.flatnonzero(keep).astype(np.int64)

    # ---- Source -----------------------------------------------------------------------------

    def __len__(self) -> int:
        return self._n_items() if self._keep is None else len(self._keep)

    def _items(self, start: int, stop: int) -> np.ndarray:
        """Item indices of samples ``[start, stop)``."""
        return np.arange(start, stop, dtype=np.int64) if self._keep is None else self._keep[start:stop]

    @property
    def has_labels(self) -> bool:
        return self._label_array is not None

    def _ids(self, start: int, stop: int) -> np.ndarray:
        return np.array(self._item_ids(self._items(start, stop)), dtype=str).reshape(-1)

    def _labels(self, start: int, stop: int) -> Optional[np.ndarray]:
        labels = self._item_labels(self._items(start, stop))
        return None if labels is None else np.asarray(labels, dtype=np.int64)

    def _read(self, start: int, stop: int) -> np.ndarray:
        items = self._items(start, stop)
        out = np.empty((len(items), *self.sample_shape), dtype=np.float32)
        for i, pixels in enumerate(self._decode_items(items)):
            out[i] = pixels.astype(np.float32) / np.float32(127.5) - np.float32(1)
        return out

    def _decode_items(self, items: np.ndarray) -> list[np.ndarray]:
        """uint8 CHW pixels of ``items``; a DataError naming the first image that cannot be used."""
        results = self._try_decode(items)
        for sid, res in results:
            if isinstance(res, str):
                raise DataError(f"{self.spec}: cannot read image {sid}: {res}"
                                + ("" if self.skip_bad else "\nfix or remove it, or pass --skip-bad to skip "
                                                            "unreadable images (they are listed)"))
        shape = getattr(self, "sample_shape", None) or results[0][1].shape
        for sid, res in results:
            if res.shape != tuple(shape):
                raise DataError(self._size_message(sid, res.shape, tuple(shape)))
        return [res for _, res in results]

    def _size_message(self, sid: str, got: tuple[int, ...], want: tuple[int, ...]) -> str:
        first = self._item_ids(self._items(0, 1))[0]
        return (f"{self.spec}: image {sid} decodes to {got[2]}x{got[1]} pixels, {got[0]} channel(s), but "
                f"{first} (the first image) to {want[2]}x{want[1]}, {want[0]}; pass --resolution R to "
                f"resize every image's short side to R and centre-crop it to R x R")

    def _try_decode(self, items: np.ndarray) -> list[tuple[str, Any]]:
        """(id, uint8 pixels or the reason it cannot be read) for each item, decoded in threads."""
        ids = self._item_ids(items)
        try:
            blobs: list[Any] = self._item_bytes(items)
        except DataError:
            raise
        except Exception:  # noqa: BLE001 - fall back to one by one, naming the item that fails
            blobs = []
            for i in items:
                try:
                    blobs.append(self._item_bytes(np.array([i]))[0])
                except Exception as exc:  # noqa: BLE001
                    blobs.append(exc)

        def one(blob: Any) -> Any:
            if isinstance(blob, BaseException):
                return _reason(blob)
            try:
                return self.transform(blob)
            except Exception as exc:  # noqa: BLE001 - Pillow raises many types on bad files
                return _reason(exc)

        if len(blobs) > 4:
            with ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1))) as pool:
                decoded = list(pool.map(one, blobs))
        else:
            decoded = [one(b) for b in blobs]
        return list(zip(ids, decoded))

    def _scan(self, start: int, raise_bad: bool) -> None:
        """Decode every item from sample ``start`` on; unreadable ones are raised (naming them) or,
        with ``raise_bad`` False, left out and listed in ``skipped``."""
        bad: list[list[str]] = []
        shape = None
        if self.transform.resolution is not None:
            r = self.transform.resolution
            shape = (self.transform.channels, r, r)
        elif start > 0:
            shape = self.sample_shape
        n = len(self)
        for i0 in range(start, n, SCAN_BLOCK):
            for sid, res in self._try_decode(self._items(i0, min(n, i0 + SCAN_BLOCK))):
                if isinstance(res, str):
                    bad.append([sid, res])
                    continue
                if shape is None:
                    shape = res.shape
                elif res.shape != shape:
                    raise DataError(self._size_message(sid, res.shape, shape))
        if bad and raise_bad:
            listed = "; ".join(f"{sid} ({why})" for sid, why in bad[:10])
            more = f" ... ({len(bad)} in all)" if len(bad) > 10 else ""
            raise DataError(f"{self.spec}: cannot read {len(bad)} image(s): {listed}{more}\nfix or remove "
                            f"them, or pass --skip-bad to skip unreadable images (they are listed in the store)")
        if bad:
            self.skipped = bad
            self._apply_skip({sid for sid, _ in bad})
        self._scanned = True

    def check_finite(self, block: int = 65536, start: int = 0) -> None:
        """Decode every image from ``start`` on (pixels are finite; what can fail is the decoding):
        a DataError names the unreadable ones, unless the source skipped them when opened."""
        if not self._scanned or start > 0:
            self._scan(start, raise_bad=True)

    # ---- identity -----------------------------------------------------------------------------

    @property
    def options(self) -> dict[str, Any]:
        t = self.transform
        opts: dict[str, Any] = {**self._kind_options(), "channels": t.channels}
        if t.resolution is not None:
            opts.update(resolution=t.resolution, interpolation=t.interpolation)
        if self.skip_bad:
            opts.update(skip_bad=True, skipped=[list(s) for s in self.skipped])
        return opts

    def pinned(self) -> dict[str, Any]:
        out: dict[str, Any] = {"options": self.options}
        if self.classes is not None:
            out["classes"] = list(self.classes)
        return out

    def _identity(self, n: int) -> list[Any]:
        """The kind, the transform, the classes, a digest of the ids and labels of the first ``n``
        samples and the kind's cheap facts about their items (e.g. byte sizes)."""
        last = int(self._items(n - 1, n)[0]) + 1 if n else 0
        t = self.transform
        return [self.kind, t.channels, t.resolution, t.interpolation if t.resolution else None,
                self.classes, self._ids_labels_digest(n), self._item_identity(last)]

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.spec!r}, n={len(self)}, sample_shape={self.sample_shape}, "
                f"labels={self.has_labels}, skipped={len(self.skipped)})")
