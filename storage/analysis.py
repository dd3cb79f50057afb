"""The store's ``analysis`` group: the layout ``pflatents analyze`` writes (read it with xarray).

Layout::

    <store>/analysis/zarr.json     attrs "pflatents_analysis": {"config": ..., "summary": ...}
    <store>/analysis/<per-dim>     float64 (R,), dimension_names ("dim",): mean, var, skew, ... of the R
                                   tested coordinates (R = the data's rank; R = D when no data
                                   direction is degenerate)
    <store>/analysis/coordinate_dims int64 (R,), ("dim",): the latent dim each coordinate stays closest to
    <store>/analysis/prior_shift   float64 (D,), ("latent_dim",): p_T's mean in prior-std units
    <store>/analysis/prior_matrix  float64 (D, R), ("latent_dim", "dim"): tested coordinates of latents
                                   z / prior_std are (z / prior_std - prior_shift) @ prior_matrix
    <store>/analysis/latent_eigenvalues float64 (D,), ("latent_dim",): the latents' covariance spectrum
                                   (prior-std units, ascending)
    <store>/analysis/<matrix>      float64 (R, R), ("dim_i", "dim_j"): corr, corr_squares, corr_abs
    <store>/analysis/<pair matrix> float64 (P, P), ("pair_i", "pair_j"): hsic, hsic_p, mi, mi_p
    <store>/analysis/pair_dims     int64 (P,), ("pair_i",): which dims the pair tests used
    <store>/analysis/sample_index  int64 (S,), ("sample",): rows given a reconstruction check
    <store>/analysis/recon_*       float32 (S,), ("sample",): per-sample errors, chunked so that each
                                   reconstruction task owns whole chunks (concurrent writers)
    <store>/analysis/data_eigenvalues float64 (D,), ("data_dim",): the data's covariance spectrum
                                   (ascending; the report marks those under the variance floor)
    <store>/analysis/ica_corr, ica_corr_squares float64 (K, K), ("ica_i", "ica_j"): correlations of
                                   FastICA's K components of the data and of their squares (--ica)
    <store>/analysis/prior_decodes float32 (M', D), ("decode", "value"): decodes of the first seeded
                                   prior draws of the realism check (at least 64, up to ~4 MB; the
                                   report's image grid or projection)

``xr.open_zarr(store, group="analysis", consolidated=False)`` reads it as one Dataset.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import zarr
from zarr.codecs import ZstdCodec

from pflatents.storage.config import config_diff, format_diff, to_json
from pflatents.storage.errors import ConfigMismatchError, StoreError
from pflatents.storage.store import LatentStore

__all__ = ["ANALYSIS_ATTR", "AnalysisConfigError", "IncompleteStoreError", "analysis_group",
           "check_analysis_config", "done_ranges", "write_arrays", "create_sample_arrays",
           "write_sample_chunk", "read_sample_arrays", "write_analysis_attrs", "read_analysis_attrs"]

GROUP = "analysis"
ANALYSIS_ATTR = "pflatents_analysis"


class AnalysisConfigError(ConfigMismatchError):
    """The store holds an analysis made with different settings."""


class IncompleteStoreError(StoreError):
    """The store has shards that are not done."""


def _root_store(store: LatentStore) -> Any:
    """The zarr Store object under a LatentStore."""
    return store.latents_array().store


def analysis_group(store: LatentStore, create: bool = False) -> zarr.Group | None:
    """The ``analysis`` group (created when ``create``), or None if absent."""
    try:
        mode = "a" if create else ("r" if store.read_only else "r+")
        return zarr.open_group(_root_store(store), path=GROUP, mode=mode, zarr_format=3)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError):
        return None


def read_analysis_attrs(store: LatentStore) -> dict[str, Any] | None:
    """The stored analysis attrs ({"config", "summary"}), or None if no analysis was written."""
    group = analysis_group(store)
    if group is None:
        return None
    value = group.attrs.get(ANALYSIS_ATTR)
    return dict(value) if isinstance(value, Mapping) else None


def check_analysis_config(store: LatentStore, config: Mapping[str, Any], overwrite: bool) -> None:
    """Refuse (naming the fields) to mix results of different settings unless ``overwrite``.

    Settings the stored analysis predates (absent from its config) do not count as a difference,
    so an analysis written by an earlier version is re-run without ``--overwrite``.

    Raises:
        AnalysisConfigError: an analysis with a different config is stored and not ``overwrite``.
    """
    stored = (read_analysis_attrs(store) or {}).get("config")
    if stored is None or overwrite:
        return
    new = {k: v for k, v in to_json(dict(config)).items() if k in stored}  # settings added since the
    diffs = config_diff(stored, new, "analysis")                          # stored analysis: not a clash
    if diffs:
        raise AnalysisConfigError(
            f"store {store.url} holds an analysis made with different settings: {format_diff(diffs)}\n"
            f"re-run with the same settings, or add --overwrite to replace it", diffs)


def reset_analysis(store: LatentStore) -> zarr.Group:
    """A fresh, empty ``analysis`` group (any previous one removed)."""
    root = zarr.open_group(_root_store(store), mode="r+", zarr_format=3)
    return root.create_group(GROUP, overwrite=True)


def done_ranges(store: LatentStore, partial: bool) -> list[tuple[int, int]]:
    """Sample ranges to analyse: every shard, or (``partial``) the done shards only, merged.

    Raises:
        IncompleteStoreError: shards are pending or failed and not ``partial``, or none is done.
    """
    pending = set(store.pending_shards())
    if pending and not partial:
        st = store.status()
        raise IncompleteStoreError(
            f"store {store.url} is incomplete: {st['failed']} failed and {st['pending']} pending of "
            f"{store.n_shards} shards\nrun `pflatents resume {store.url}` first, or analyse the done "
            f"shards only with --partial")
    ranges: list[tuple[int, int]] = []
    for sid in range(store.n_shards):
        if sid in pending:
            continue
        i0, i1 = store.shard_range(sid)
        if ranges and ranges[-1][1] == i0:
            ranges[-1] = (ranges[-1][0], i1)
        else:
            ranges.append((i0, i1))
    if not ranges:
        raise IncompleteStoreError(f"store {store.url} has no done shards; nothing to analyse")
    return ranges


def write_arrays(group: zarr.Group, arrays: Mapping[str, tuple[np.ndarray, tuple[str, ...]]]) -> None:
    """Write small whole arrays ``name -> (values, dimension_names)``, replacing existing ones."""
    for name, (values, dims) in arrays.items():
        v = np.asarray(values)
        if v.ndim != len(dims):
            raise StoreError(f"analysis array {name!r} has {v.ndim} axes but dimension names {dims}")
        arr = group.create_array(name, shape=v.shape, dtype=v.dtype, chunks=v.shape or None,
                                 compressors=ZstdCodec(level=3), dimension_names=dims, overwrite=True)
        arr[...] = v


def create_sample_arrays(group: zarr.Group, sample_index: np.ndarray, chunk: int,
                         names: list[str]) -> None:
    """``sample_index`` and empty float32 per-sample arrays (NaN until written), ``chunk`` rows per chunk."""
    n = len(sample_index)
    idx = group.create_array("sample_index", shape=(n,), dtype="int64", chunks=(chunk,),
                             dimension_names=("sample",), overwrite=True)
    idx[:] = np.asarray(sample_index, dtype=np.int64)
    for name in names:
        group.create_array(name, shape=(n,), dtype="float32", chunks=(chunk,), fill_value=np.nan,
                           compressors=ZstdCodec(level=3), dimension_names=("sample",), overwrite=True)


def write_sample_chunk(store: LatentStore, i0: int, values: Mapping[str, np.ndarray]) -> None:
    """Write whole chunks of per-sample arrays starting at position ``i0`` (chunk-aligned)."""
    group = analysis_group(store)
    if group is None:
        raise StoreError(f"store {store.url} has no analysis group to write into")
    for name, v in values.items():
        arr = group[name]
        if i0 % arr.chunks[0]:
            raise StoreError(f"analysis write of {name!r} at {i0} is not chunk-aligned ({arr.chunks[0]})")
        arr[i0:i0 + len(v)] = np.asarray(v, dtype=arr.dtype)


def read_sample_arrays(store: LatentStore, names: list[str], start: int = 0, stop: int | None = None
                       ) -> dict[str, np.ndarray]:
    """Read per-sample analysis arrays (those present) over positions ``[start, stop)``."""
    group = analysis_group(store)
    if group is None:
        return {}
    return {n: np.asarray(group[n][start:stop]) for n in names if n in group}


def write_analysis_attrs(group: zarr.Group, config: Mapping[str, Any], summary: Mapping[str, Any]) -> None:
    """Record the analysis config and its summary (plain JSON) in the group's attrs."""
    group.attrs.put({ANALYSIS_ATTR: {"config": to_json(dict(config), "analysis config"),
                                     "summary": to_json(dict(summary), "analysis summary")}})
