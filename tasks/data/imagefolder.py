"""``imagefolder:DIR``: the image files under a folder, recursively, with their classes.

As torchvision's ``ImageFolder`` and Hugging Face's ``imagefolder`` read it: when the images lie in
first-level subfolders, each subfolder is a class, labelled by its position among the sorted folder
names (``DIR/cat/...`` -> 0, ``DIR/dog/...`` -> 1; deeper folders belong to their first-level one);
images directly in DIR with no subfolders carry no label. The sample id is the file's path relative
to DIR (``/``-separated); samples are in the order of their paths (compared folder by folder).
Hidden files and folders (a leading ``.``) are ignored. Any size and mode: the transform and the
skip list are ``pflatents.tasks.data.images``'s.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import numpy as np

from pflatents.tasks.data.images import EncodedImageSource
from pflatents.tasks.errors import DataError

__all__ = ["ImageFolderSource", "IMAGE_FILE_SUFFIXES"]

IMAGE_FILE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


class ImageFolderSource(EncodedImageSource):
    """Images under ``directory`` (recursive), classes from the first level of subfolders."""

    kind = "imagefolder"

    def __init__(self, spec: str, directory: str, **options: Any) -> None:
        self.spec = spec
        self.root = Path(directory).expanduser()
        if not self.root.is_dir():
            raise DataError(f"image folder not found: {self.root}")
        self.files = _walk(self.root)
        if not self.files:
            raise DataError(f"no image files ({', '.join(sorted(IMAGE_FILE_SUFFIXES))}) under {self.root}")
        top = [f for f in self.files if "/" not in f]
        nested = [f for f in self.files if "/" in f]
        if top and nested:
            raise DataError(f"{spec}: images lie both directly in {self.root} (e.g. {top[0]}) and in subfolders "
                            f"(e.g. {nested[0]}); subfolders are classes, so move the loose images into a class "
                            f"folder, or point at a folder that holds only one of the two")
        if nested:
            self.classes = sorted({f.split("/", 1)[0] for f in nested})
            index = {c: i for i, c in enumerate(self.classes)}
            self._label_array = np.array([index[f.split("/", 1)[0]] for f in self.files], dtype=np.int64)
        else:
            self.classes, self._label_array = None, None
        self._setup(**options)

    def _n_items(self) -> int:
        return len(self.files)

    def _item_ids(self, items: np.ndarray) -> list[str]:
        return [self.files[int(i)] for i in items]

    def _item_bytes(self, items: np.ndarray) -> list[bytes]:
        return [(self.root / self.files[int(i)]).read_bytes() for i in items]

    def _item_identity(self, n_items: int) -> list[Any]:
        """Byte size of each of the first ``n_items`` files (one stat each)."""
        return [(self.root / f).stat().st_size for f in self.files[:n_items]]


def _walk(root: Path) -> list[str]:
    """Relative paths of the image files under ``root``, hidden entries left out, sorted by parts."""
    found: list[tuple[str, ...]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel = Path(dirpath).relative_to(root).parts
        for name in filenames:
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_FILE_SUFFIXES:
                found.append((*rel, name))
    return ["/".join(parts) for parts in sorted(found)]
