"""``parquet:PATH``: images in a parquet file, a folder of parquet files, or a Hugging Face ``datasets``
folder written by ``save_to_disk`` (its arrow files), read with pyarrow.

Files: a single ``.parquet`` file; a folder with a ``state.json`` (``Dataset.save_to_disk``: its
``.arrow`` files in the order it lists); or any other folder: its ``*.parquet`` files, recursively, in
path order. A ``DatasetDict`` folder (``dataset_dict.json``) is refused naming its splits: give the
split's folder. Rows are the samples, file after file.

Columns: ``image_column`` (default ``image``, else ``img``) holds each image as Hugging Face's
``Image`` feature stores it (a struct ``{"bytes", "path"}``; the path is read, relative to the file's
folder, when the bytes are null), as raw encoded bytes, or as a path. ``label_column`` (default
``label`` when there is one; ``""``: no labels) holds integer class labels (null: -1); class names come from the
``datasets`` features (``ClassLabel``) recorded in the file's schema or ``dataset_info.json``.
``id_column`` (default none) gives the sample ids; without it a sample's id is
``<file relative to PATH>:<row in that file>``. Parquet files are read a row group at a time, only the
image column; arrow files are memory-mapped.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import numpy as np

from pflatents.tasks.data.images import EncodedImageSource
from pflatents.tasks.errors import DataError

__all__ = ["ParquetSource"]


class _File:
    """One parquet or arrow file: its rows, columns and a reader of row ranges of one column."""

    def __init__(self, path: Path, name: str) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.path, self.name = path, name
        self.table = None
        self.pf = None
        try:
            if path.suffix == ".arrow":
                source = pa.memory_map(str(path))
                try:
                    self.table = pa.ipc.open_stream(source).read_all()
                except pa.ArrowInvalid:
                    self.table = pa.ipc.open_file(source).read_all()
                self.schema, self.n = self.table.schema, self.table.num_rows
            else:
                self.pf = pq.ParquetFile(str(path))
                self.schema, self.n = self.pf.schema_arrow, self.pf.metadata.num_rows
                groups = [self.pf.metadata.row_group(i).num_rows for i in range(self.pf.num_row_groups)]
                self.group_ends = np.cumsum(groups)
        except (OSError, pa.ArrowException) as exc:
            raise DataError(f"cannot read {path} as a {'arrow' if path.suffix == '.arrow' else 'parquet'} "
                            f"file: {exc}") from exc
        self._cache: tuple[int, str, Any] | None = None

    def column(self, name: str) -> list[Any]:
        """A whole column as Python values (labels and ids: small)."""
        if self.table is not None:
            return self.table.column(name).to_pylist()
        return self.pf.read(columns=[name]).column(name).to_pylist()  # type: ignore[union-attr]

    def cells(self, name: str, rows: np.ndarray) -> list[Any]:
        """The values of ``name`` at ``rows`` (sorted), reading only the row groups that hold them."""
        if self.table is not None:
            col = self.table.column(name)
            return [col[int(r)].as_py() for r in rows]
        out = []
        for r in rows:
            g = int(np.searchsorted(self.group_ends, int(r), side="right"))
            if self._cache is None or self._cache[:2] != (g, name):
                self._cache = (g, name, self.pf.read_row_group(g, columns=[name]).column(name))  # type: ignore[union-attr]
            first = int(self.group_ends[g - 1]) if g else 0
            out.append(self._cache[2][int(r) - first].as_py())
        return out

    def class_names(self, column: str) -> Optional[list[str]]:
        """ClassLabel names recorded by ``datasets`` in the schema metadata, if any."""
        meta = (self.schema.metadata or {}).get(b"huggingface")
        if not meta:
            return None
        try:
            feature = json.loads(meta)["info"]["features"][column]
        except (ValueError, KeyError, TypeError):
            return None
        names = feature.get("names") if isinstance(feature, dict) else None
        return [str(n) for n in names] if isinstance(names, list) else None


def _find_files(root: Path) -> list[tuple[Path, str]]:
    """(path, name relative to the spec's path) of the files a ``parquet:PATH`` spec names."""
    if root.is_file():
        return [(root, root.name)]
    if not root.is_dir():
        raise DataError(f"parquet data not found: {root}")
    if (root / "dataset_dict.json").is_file():
        try:
            splits = json.loads((root / "dataset_dict.json").read_text()).get("splits", [])
        except ValueError:
            splits = []
        raise DataError(f"{root} is a datasets DatasetDict folder; name one split's folder, e.g. "
                        f"parquet:{root / (splits[0] if splits else 'train')} (splits: {', '.join(splits) or '?'})")
    state = root / "state.json"
    if state.is_file():
        try:
            names = [d["filename"] for d in json.loads(state.read_text())["_data_files"]]
        except (ValueError, KeyError, TypeError) as exc:
            raise DataError(f"cannot read the datasets state file {state}: {exc}") from exc
        return [(root / n, n) for n in names]
    found = sorted((p for p in root.rglob("*.parquet") if not any(s.startswith(".") for s in p.relative_to(root).parts)),
                   key=lambda p: p.relative_to(root).parts)
    if not found:
        raise DataError(f"no .parquet files under {root} (and no datasets state.json)")
    return [(p, p.relative_to(root).as_posix()) for p in found]


class ParquetSource(EncodedImageSource):
    """Image rows of parquet / arrow files (see the module docstring)."""

    kind = "parquet"

    def __init__(self, spec: str, path: str, *, image_column: Optional[str] = None,
                 label_column: Optional[str] = None, id_column: Optional[str] = None, **options: Any) -> None:
        self.spec, self.root = spec, Path(path).expanduser()
        self.files = [_File(p, n) for p, n in _find_files(self.root)]
        self._ends = np.cumsum([f.n for f in self.files])
        if int(self._ends[-1]) == 0:
            raise DataError(f"{spec}: the {len(self.files)} file(s) hold no rows")
        columns = list(self.files[0].schema.names)
        for f in self.files[1:]:
            if list(f.schema.names) != columns:
                raise DataError(f"{spec}: {f.name} has columns {list(f.schema.names)}, but {self.files[0].name} "
                                f"has {columns}; all files must share one schema")
        if image_column is None:
            image_column = next((c for c in ("image", "img") if c in columns), None)
            if image_column is None:
                raise DataError(f"{spec}: no 'image' or 'img' column (columns: {', '.join(columns)}); "
                                f"choose one with --image-column")
        explicit_label = bool(label_column)
        if label_column is None and "label" in columns:
            label_column = "label"
        label_column = label_column or None  # "": no labels
        for flag, col in (("--image-column", image_column), ("--label-column", label_column if explicit_label else None),
                          ("--id-column", id_column)):
            if col is not None and col not in columns:
                raise DataError(f"{spec}: no column '{col}' ({flag}); columns: {', '.join(columns)}")
        self.image_column, self.label_column, self.id_column = image_column, label_column, id_column
        self._label_array = self._read_labels() if label_column else None
        self.classes = self._class_names() if label_column else None
        self._id_array = None
        if id_column is not None:
            self._id_array = np.array([str(v) for f in self.files for v in f.column(id_column)], dtype=str)
        self._setup(**options)

    def _read_labels(self) -> np.ndarray:
        values = [v for f in self.files for v in f.column(self.label_column)]  # type: ignore[arg-type]
        out = np.full(len(values), -1, dtype=np.int64)
        for i, v in enumerate(values):
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise DataError(f"{self.spec}: label column '{self.label_column}' holds {v!r} (row {i}); class "
                                f"labels must be integers (a datasets ClassLabel)")
            out[i] = int(v)
        return out

    def _class_names(self) -> Optional[list[str]]:
        names = self.files[0].class_names(self.label_column)  # type: ignore[arg-type]
        info = self.root / "dataset_info.json" if self.root.is_dir() else None
        if names is None and info is not None and info.is_file():
            try:
                feature = json.loads(info.read_text())["features"][self.label_column]
                names = [str(n) for n in feature["names"]]
            except (ValueError, KeyError, TypeError):
                names = None
        return names

    def _locate(self, items: np.ndarray) -> list[tuple[int, np.ndarray, np.ndarray]]:
        """(file index, positions in ``items``, rows in that file) for each file ``items`` touch."""
        files = np.searchsorted(self._ends, items, side="right")
        out = []
        for k in np.unique(files):
            pos = np.flatnonzero(files == k)
            first = int(self._ends[k - 1]) if k else 0
            out.append((int(k), pos, items[pos] - first))
        return out

    def _n_items(self) -> int:
        return int(self._ends[-1])

    def _item_ids(self, items: np.ndarray) -> list[str]:
        if self._id_array is not None:
            return [str(s) for s in self._id_array[items]]
        out: list[str] = [""] * len(items)
        for k, pos, rows in self._locate(np.asarray(items)):
            for p, r in zip(pos, rows):
                out[int(p)] = f"{self.files[k].name}:{int(r)}"
        return out

    def _item_bytes(self, items: np.ndarray) -> list[bytes]:
        out: list[Any] = [None] * len(items)
        for k, pos, rows in self._locate(np.asarray(items)):
            f = self.files[k]
            for p, cell in zip(pos, f.cells(self.image_column, rows)):  # type: ignore[arg-type]
                out[int(p)] = self._cell_bytes(f, cell)
        return out

    def _cell_bytes(self, f: _File, cell: Any) -> bytes:
        if isinstance(cell, dict):
            if cell.get("bytes") is not None:
                return bytes(cell["bytes"])
            cell = cell.get("path")
        if isinstance(cell, (bytes, bytearray, memoryview)):
            return bytes(cell)
        if isinstance(cell, str) and cell:
            p = Path(cell).expanduser()
            return (p if p.is_absolute() else f.path.parent / p).read_bytes()
        raise ValueError(f"the '{self.image_column}' cell holds no image ({type(cell).__name__})")

    def _kind_options(self) -> dict[str, Any]:
        return {"image_column": self.image_column, "label_column": self.label_column or "", "id_column": self.id_column}

    def _item_identity(self, n_items: int) -> list[Any]:
        """The files' names and row counts up to ``n_items`` rows."""
        out, start = [], 0
        for f in self.files:
            if start >= n_items:
                break
            out.append([f.name, min(f.n, n_items - start)])
            start += f.n
        return out
