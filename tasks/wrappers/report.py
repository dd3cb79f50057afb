"""The report task: gathers what the figures need from the store's ``analysis`` group, the latents,
the data and (for round-trip images) the model, and writes report.html / report.md.

Everything it reads is bounded whatever the store's size: a 2000-row latent subsample, the stored
matrices, at most 16 images a grid, a 2000-row data subsample for the projection, and one chunked
pass over at most ``REFERENCE_ROWS`` training rows for the decodes' nearest neighbours.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE

from pflatents.storage import LatentStore
from pflatents.storage.analysis import analysis_group
from pflatents.tasks.analysis.realism import requantise
from pflatents.tasks.analysis.reconstruct import read_rows
from pflatents.tasks.data.registry import is_pixel_data
from pflatents.tasks.data.sources import open_pinned
from pflatents.tasks.models.registry import load_model, resolve_device
from pflatents.tasks.wrappers.analyze import (cond_labels, pinned_config, read_latents, recon_values, store_data, stored_target,
                                              subsample, usable_rows)
from pflatents.tasks.wrappers.realism import comparison_rows, reference_rows

__all__ = ["image_shape", "nearest_rows", "write_analysis_report", "GRID"]

GRID = 16            # images per grid
SAMPLE_ROWS = 2000   # latent rows for the normality figures, data rows for the projection


def image_shape(store: LatentStore) -> tuple[int, ...] | None:
    """CHW shape to show samples as images: 3-D samples, or flat quantised square ones (digits)."""
    shape = store.sample_shape
    if len(shape) == 3:
        return shape
    side = int(round(np.sqrt(shape[0]))) if len(shape) == 1 else 0
    quantised = is_pixel_data((store.config.get("data") or {}).get("spec", ""))
    return (1, side, side) if side * side == shape[0] and side > 1 and quantised else None


def nearest_rows(source: Any, rows: np.ndarray, queries: np.ndarray, block_bytes: int = 32 << 20
                 ) -> tuple[np.ndarray, np.ndarray]:
    """For each query, the index (into ``rows``) of its nearest data row and the Euclidean distance,
    in one pass over ``rows`` read ``block_bytes`` at a time."""
    q = np.asarray(queries, dtype=np.float64).reshape(len(queries), -1)
    qq = (q * q).sum(1)
    best = np.full(len(q), np.inf)
    arg = np.zeros(len(q), np.int64)
    step = max(1, block_bytes // max(1, source.sample_nbytes))
    for i in range(0, len(rows), step):
        x = read_rows(source, rows[i:i + step]).reshape(-1, q.shape[1]).astype(np.float64)
        d2 = np.maximum(qq[:, None] + (x * x).sum(1)[None, :] - 2.0 * q @ x.T, 0.0)
        j = d2.argmin(1)
        hit = d2[np.arange(len(q)), j] < best
        best[hit], arg[hit] = d2[hit, j[hit]], i + j[hit]
    return arg, np.sqrt(best)


def _round_trip_images(store: LatentStore, index: np.ndarray, device: str) -> dict[str, np.ndarray]:
    """The first reconstructed samples and their round trips (decoded again: a few images)."""
    from pflatents.tasks.ode.batches import decode_block

    if not len(index):
        return {}
    cfg = pinned_config(store)
    sde = cfg.make_sde()
    model = load_model(cfg.model.spec, sde, precision=cfg.precision, compile=cfg.compile)
    idx = index[:GRID]
    z = read_latents(store, idx).astype(np.float32)
    recon = decode_block(model, sde, z, cfg.make_solver(), cfg.batch_size, resolve_device(device), cfg.dtype,
                         cond_labels(store, cfg, idx))[0]
    return {"original": read_rows(open_pinned(cfg.data), idx), "reconstructed": recon}


def _realism_data(store: LatentStore, ranges: list[list[int]], summary: dict[str, Any], shape: tuple | None,
                  seed: int) -> dict[str, Any]:
    """Stored prior decodes; their nearest training samples (images) or a data subsample (flat data)."""
    group = analysis_group(store)
    if group is None or "prior_decodes" not in group:
        return {}
    dec = np.asarray(group["prior_decodes"][:], dtype=np.float64)
    dec = dec[np.isfinite(dec).all(1)]
    source, _ = store_data(store, ranges)
    if source is None or not len(dec):
        return {}
    out: dict[str, Any] = {"prior_decodes": dec}
    if shape is None:
        out["data_rows"] = read_rows(source, subsample(usable_rows(ranges), SAMPLE_ROWS, seed, 10))
        return out
    prior = summary.get("prior") or {}
    train, _, against = comparison_rows(store, ranges, int(prior.get("m") or len(dec)), seed)
    ref = reference_rows(train, seed)
    shown = requantise(dec[:GRID], source.quantization)
    arg, dist = nearest_rows(source, ref, shown)
    order = np.argsort(ref[arg], kind="stable")
    near = np.empty((len(arg), *source.sample_shape), np.float32)
    near[order] = read_rows(source, ref[arg][order])
    which = "training rows" if against.startswith("held-out") else "the other data rows"
    out.update(prior_decodes=shown, prior_nearest=near, prior_nearest_distance=dist,
               prior_nearest_reference=f"{len(ref)} {which}")
    return out


@task(name="write_analysis_report", cache_policy=NO_CACHE, persist_result=False)
def write_analysis_report(store_url: str, ranges: list[list[int]], summary: dict[str, Any], directory: str,
                          prior_std: float, device: str = "auto", seed: int = 0) -> dict[str, str]:
    """Figures from the stored analysis arrays, a seeded latent subsample and the data; writes
    report.html (self-contained) and report.md with its PNGs."""
    from pflatents.tasks.analysis.report import write_report

    store = LatentStore.open(store_url, mode="r")
    group = analysis_group(store)
    rows = subsample(usable_rows(ranges), SAMPLE_ROWS, seed, 8)
    sample = stored_target(store).apply(read_latents(store, rows) / prior_std)
    data: dict[str, Any] = {"sample": sample.reshape(len(sample), -1)}
    for name, key in (("corr", "corr"), ("corr_squares", "corr_sq"), ("ica_corr", "ica_corr"),
                      ("ica_corr_squares", "ica_corr_sq"), ("data_eigenvalues", "data_eigenvalues"),
                      ("normality_fail", "normality_fail")):
        if name in group:  # type: ignore[operator]
            data[key] = np.asarray(group[name][:])  # type: ignore[index]
    if "normality_fail" in data:
        data["normality_fail"] = data["normality_fail"].astype(bool)
    rec = recon_values(store)
    if "recon_max_abs" in rec:
        data["recon_err"] = rec["recon_max_abs"]
        if "encode_max_abs" in rec:
            data["encode_err"] = rec["encode_max_abs"]
    shape = image_shape(store)
    if shape is not None:
        data["image_shape"] = shape
        imgs = _round_trip_images(store, rec.get("sample_index", np.empty(0, np.int64)), device)
        data["images"] = {k: v.reshape(len(v), *shape) for k, v in imgs.items()}
    data.update(_realism_data(store, ranges, summary, shape, seed))
    return write_report(directory, summary, data)
