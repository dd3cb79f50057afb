"""The units of analysis work as thin Prefect tasks: statistics, reconstruction chunks, ICA, report.

Tasks receive the store URL, sample ranges and plain settings, never arrays; they write arrays into
the store's ``analysis`` group (each reconstruction task owns whole chunks) and return small dicts.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE

from pflatents.storage import LatentStore
from pflatents.storage.analysis import analysis_group, read_sample_arrays, write_arrays, write_sample_chunk
from pflatents.tasks.analysis.ica import ica_table
from pflatents.tasks.models.registry import load_model, resolve_device
from pflatents.tasks.analysis.reconstruct import read_rows, reconstruct_rows
from pflatents.tasks.data.sources import open_pinned
from pflatents.tasks.analysis.dependence import TD_ROWS, dcor_tests, select_pairs, total_dependence
from pflatents.tasks.analysis.prior import PriorTarget, prior_target, standard_target
from pflatents.tasks.analysis.spectrum import DataSpectrum, data_spectrum, latent_spectrum, moments_pass
from pflatents.tasks.analysis.stats import StatsConfig, compute_stats
from pflatents.tasks.analysis.summary import summarise
from pflatents.tasks.errors import InputError

__all__ = ["pinned_config", "store_data", "drop_flagged", "subsample", "cond_labels", "compute_latent_stats", "reconstruct_chunk", "compare_ica", "usable_rows", "read_latents",
           "latents_dask", "RECON_ARRAYS"]

RECON_ARRAYS = ["recon_max_abs", "recon_rmse", "recon_nfe", "recon_status"]


def pinned_config(store: LatentStore) -> Any:
    """The store's pinned extraction config."""
    from pflatents.tasks.config import ExtractConfig

    return ExtractConfig.from_store(store)



def drop_flagged(store: LatentStore, ranges: list[list[int]]) -> tuple[list[list[int]], int]:
    """The ranges without the samples the solver flagged (their latents are NaN), and how many:
    ``LatentStore.failed_mask`` marks them."""
    out: list[list[int]] = []
    n_flagged = 0
    for a, b in ranges:
        bad = np.flatnonzero(store.failed_mask(a, b)) + a
        n_flagged += len(bad)
        edges = [a, *(v for k in bad for v in (int(k), int(k) + 1)), b]
        out += [[lo, hi] for lo, hi in zip(edges[::2], edges[1::2]) if hi > lo]
    return out, n_flagged


def usable_rows(ranges: list[list[int]]) -> np.ndarray:
    """Every sample index in the given ``[start, stop)`` ranges."""
    return np.concatenate([np.arange(a, b) for a, b in ranges]).astype(np.int64)


def latents_dask(store: LatentStore, ranges: list[list[int]], rows: int | None) -> Any:
    """The latents of the given ranges as one dask array (N_used, ...), chunk-aligned."""
    import dask.array as da

    x = store.latents_dask(rows or store.dask_rows(32 << 20))  # ~32 MiB float32 per chunk
    parts = [x[a:b] for a, b in ranges]
    return parts[0] if len(parts) == 1 else da.concatenate(parts)


def read_latents(store: LatentStore, index: np.ndarray) -> np.ndarray:
    """Latent rows ``index`` (sorted) as float64."""
    return np.asarray(store.latents_array().oindex[np.asarray(index, dtype=np.int64)], dtype=np.float64)


def cond_labels(store: LatentStore, cfg: Any, index: np.ndarray) -> np.ndarray | None:
    """The class labels rows ``index`` were conditioned on at extraction, aligned with ``index``: the
    store's ``label`` array (the source's labels) through ``cfg.cond_labels``, so a pinned
    ``--class-label K`` wins; None when neither exists (an unconditional model ignores them anyway)."""
    return cfg.cond_labels(store.labels_at(index), len(index))


def subsample(rows: np.ndarray, n: int, seed: int, stream: int) -> np.ndarray:
    """A seeded, sorted subsample of ``n`` of ``rows`` (all if fewer)."""
    if n >= len(rows):
        return rows
    return np.sort(np.random.default_rng([seed, stream]).choice(rows, n, replace=False))


def _values(source: Any, start: int, stop: int) -> np.ndarray:
    """The samples of rows ``[start, stop)`` (a dask task: the source's batch without ids and labels)."""
    return source.read(start, stop).x


def source_dask(source: Any, ranges: list[list[int]], rows: int) -> Any:
    """The data rows of ``ranges`` as one dask array (read lazily, ``rows`` per chunk)."""
    import dask
    import dask.array as da

    parts = [da.from_delayed(dask.delayed(_values)(source, i, min(i + rows, b)),
                             shape=(min(i + rows, b) - i, *source.sample_shape), dtype=source.dtype)
             for a, b in ranges for i in range(a, b, rows)]
    return parts[0] if len(parts) == 1 else da.concatenate(parts)


def store_data(store: LatentStore, ranges: list[list[int]]) -> tuple[Any, str]:
    """The store's data source, or None and why not: it cannot be read, it is not the data the store
    was extracted from (fingerprint of the pinned length), or it is shorter than the analysed rows."""
    cfg = pinned_config(store)
    spec = cfg.data.spec
    try:
        source = open_pinned(cfg.data)
        n_pinned = cfg.data.n_samples
        if n_pinned is not None and cfg.data.fingerprint and \
                source.fingerprint(min(int(n_pinned), len(source))) != cfg.data.fingerprint:
            return None, f"the data {spec} differs from the data the store was extracted from"
        if len(source) < max(b for _, b in ranges):
            return None, f"the data {spec} has {len(source)} samples, fewer than the store"
    except (InputError, OSError) as e:
        return None, f"the data {spec!r} cannot be read: {str(e).splitlines()[0]}"
    return source, ""


def latent_target(store: LatentStore, ranges: list[list[int]], alpha: float
                  ) -> tuple[PriorTarget, DataSpectrum | None]:
    """The true prior p_T and the data's degenerate directions from one pass over the store's data;
    N(0, I) with the reason when the data cannot be used (``store_data``)."""
    source, why = store_data(store, ranges)
    if source is None:
        return standard_target(why), None
    rows = max(1, (32 << 20) // max(source.sample_nbytes, 1))
    n, mean, cov = moments_pass(source_dask(source, ranges, rows))
    spectrum = data_spectrum(n, mean, cov, source.quantization)
    return prior_target(spectrum, pinned_config(store).make_sde(), alpha), spectrum


def stored_target(store: LatentStore) -> PriorTarget:
    """The tested coordinates recorded by the statistics task (identity if none)."""
    group = analysis_group(store)
    if group is None or "prior_matrix" not in group:
        return standard_target("no target recorded")
    return PriorTarget(np.asarray(group["prior_shift"][:]), np.asarray(group["prior_matrix"][:]), {})


def _stats_arrays(res: dict[str, Any]) -> dict[str, tuple[np.ndarray, tuple[str, ...]]]:
    """The statistics as named arrays with dimension names for the analysis group."""
    nm = res["normality"]
    per_dim = {k: nm[k] for k in ("mean", "var", "skew", "kurt", "ks", "ad", "p_mean", "p_var", "p_jb",
                                  "p_ks", "p_ad", "p_chi2", "p_dim")}
    out = {("excess_kurtosis" if k == "kurt" else k): (np.asarray(v, np.float64), ("dim",))
           for k, v in per_dim.items()}
    out["normality_fail"] = (nm["fail"].astype(np.int8), ("dim",))
    for key, name in (("corr_z", "corr"), ("corr_sq", "corr_squares"), ("corr_abs", "corr_abs")):
        out[name] = (res[key], ("dim_i", "dim_j"))
    for key in ("hsic", "hsic_p", "mi", "mi_p"):
        out[key] = (res[key], ("pair_i", "pair_j"))
    out["pair_dims"] = (np.asarray(res["pair_dims"], np.int64), ("pair_i",))
    return out


def _target_arrays(target: PriorTarget, d: int) -> dict[str, tuple[np.ndarray, tuple[str, ...]]]:
    """p_T's shift and the tested-coordinate matrix, and the latent dim each coordinate stays near."""
    shift = np.zeros(d) if target.shift is None else target.shift
    matrix = np.eye(d) if target.matrix is None else target.matrix
    labels = np.asarray(target.info.get("coordinate_dims", np.arange(matrix.shape[1])), np.int64)
    return {"prior_shift": (shift, ("latent_dim",)), "prior_matrix": (matrix, ("latent_dim", "dim")),
            "coordinate_dims": (labels, ("dim",))}


@task(name="compute_latent_stats", cache_policy=NO_CACHE, persist_result=False)
def compute_latent_stats(store_url: str, ranges: list[list[int]], stats_cfg: dict[str, Any],
                         prior_std: float, rows: int | None = None) -> dict[str, Any]:
    """One pass over the data (its spectrum, p_T), one dask pass over the latents in the tested
    coordinates (latents / prior std, standardised by p_T, degenerate directions out), dCor on a subsample."""
    store = LatentStore.open(store_url, mode="r+")
    cfg = StatsConfig(**stats_cfg)
    target, spectrum = latent_target(store, ranges, cfg.alpha)
    res = compute_stats(latents_dask(store, ranges, rows) / prior_std, cfg, shift=target.shift, matrix=target.matrix)
    sample = target.apply(read_latents(store, subsample(usable_rows(ranges), cfg.dcor_n, cfg.seed, 6)) / prior_std)
    dcor = dcor_tests(sample, select_pairs(res, cfg), cfg)
    d = int(np.prod(store.sample_shape))
    write_arrays(analysis_group(store, create=True), {**_stats_arrays(res), **_target_arrays(target, d)})
    labels = target.info.get("coordinate_dims")
    summary = summarise(res, dcor, cfg, labels=None if labels is None else np.asarray(labels))
    full_mean, full_cov = (res["full_mean"], res["full_cov"]) if "full_cov" in res else \
        (res["normality"]["mean"], res["cov_z"])
    sp = latent_spectrum(spectrum, full_mean, full_cov, target.degenerate_var)
    eig = {"latent_eigenvalues": (sp["eigenvalues"], ("latent_dim",))}
    if spectrum is not None:  # the data's spectrum: the report marks the degenerate directions on it
        eig["data_eigenvalues"] = (np.sort(np.linalg.eigvalsh(spectrum.cov)), ("data_dim",))
    write_arrays(analysis_group(store), eig)
    if spectrum is None:
        sp["data"]["reason"] = target.info.get("reason")
    summary["independence"]["gaussian_total_correlation_top"] = sp["total_correlation_top"]
    td_rows = subsample(usable_rows(ranges), TD_ROWS, cfg.seed, 9)  # total dependence left: a seeded subsample
    summary["independence"]["total_dependence"] = total_dependence(
        target.apply(read_latents(store, td_rows) / prior_std), cfg.seed, cfg.alpha)
    return {**summary, "data": sp["data"], "latent": sp["latent"], "prior_target": target.info}


@task(name="reconstruct_chunk", cache_policy=NO_CACHE, persist_result=False)
def reconstruct_chunk(store_url: str, chunk_id: int, device: str = "auto") -> dict[str, Any]:
    """Decode one chunk of the analysis ``sample_index`` and write its per-sample errors."""
    store = LatentStore.open(store_url, mode="r+")
    cfg = pinned_config(store)
    idx_arr = analysis_group(store)["sample_index"]  # type: ignore[index]
    size = idx_arr.chunks[0]
    i0 = chunk_id * size
    index = np.asarray(idx_arr[i0:i0 + size])
    source, sde = open_pinned(cfg.data), cfg.make_sde()
    z = read_latents(store, index).astype(np.float32)
    x = read_rows(source, index)
    values = reconstruct_rows(load_model(cfg.model.spec, sde, precision=cfg.precision, compile=cfg.compile),
                              sde, z, x, cfg.make_solver(),
                              cfg.batch_size, resolve_device(device), cfg.dtype, source.quantization,
                              labels=cond_labels(store, cfg, index))
    write_sample_chunk(store, i0, values)
    return {"chunk": chunk_id, "n": int(len(index)), "max_abs_error": float(values["recon_max_abs"].max())}


@task(name="compare_ica", cache_policy=NO_CACHE, persist_result=False)
def compare_ica(store_url: str, ranges: list[list[int]], stats_cfg: dict[str, Any], ica_n: int,
                sources: str | None, prior_std: float) -> dict[str, Any]:
    """FastICA on a seeded subsample of the data; the comparison table on the same rows."""
    store = LatentStore.open(store_url, mode="r+")
    cfg = StatsConfig(**stats_cfg)
    index = subsample(usable_rows(ranges), ica_n, cfg.seed, 7)
    x = read_rows(open_pinned(pinned_config(store).data), index)
    s = np.asarray(np.load(sources, mmap_mode="r")[index], np.float64) if sources else None
    mats: dict[str, Any] = {}
    table = ica_table(x, stored_target(store).apply(read_latents(store, index) / prior_std), s, cfg, mats)
    corr, corr_sq = mats["FastICA(data)"]
    write_arrays(analysis_group(store, create=True), {"ica_corr": (corr, ("ica_i", "ica_j")),
                                                      "ica_corr_squares": (corr_sq, ("ica_i", "ica_j"))})
    return {"rows": int(len(index)), "sources": sources, "table": table}


def recon_values(store: LatentStore) -> dict[str, np.ndarray]:
    """The per-sample reconstruction arrays written so far, with ``sample_index``."""
    names = ["sample_index", *RECON_ARRAYS, "recon_requantised_exact", "encode_max_abs", "encode_rmse"]
    return read_sample_arrays(store, names)
