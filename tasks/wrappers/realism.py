"""Prefect tasks for the questions that need the model or the training split: decodes of fresh prior
draws against the data (realism, memorisation), and the statistics of training vs held-out rows.

The training split is known when the store's model is a pflatents checkpoint trained with
``--holdout`` on the same data (the checkpoint's recorded fingerprint equals the store's).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE

from pflatents.storage import LatentStore
from pflatents.storage.analysis import analysis_group, write_arrays
from pflatents.tasks.analysis.realism import prior_labels, realism
from pflatents.tasks.analysis.reconstruct import read_rows
from pflatents.tasks.analysis.stats import StatsConfig, compute_stats
from pflatents.tasks.analysis.summary import independence_failures, summarise
from pflatents.tasks.errors import InputError
from pflatents.tasks.models.registry import load_model, resolve_device
from pflatents.tasks.wrappers.analyze import (latents_dask, pinned_config, recon_values, store_data, stored_target,
                                              subsample, usable_rows)

__all__ = ["model_split", "comparison_rows", "reference_rows", "check_prior_decodes", "split_stats", "REFERENCE_ROWS"]

REFERENCE_ROWS = 50_000  # nearest-neighbour reference: at most this many (seeded) training rows
KEEP_DECODE_VALUES = 1 << 20  # decodes kept for the report: up to ~4 MB of float32 values (at least 64 decodes)


def model_split(store: LatentStore) -> tuple[dict[str, Any] | None, str]:
    """The model's recorded train/held-out split when it applies to this store's data, and a note."""
    from pflatents.tasks.models.registry import model_kind

    cfg = pinned_config(store)
    try:
        kind, rest = model_kind(str(cfg.model.spec))
        data = kind.training_data(rest)
        if data is None:
            return None, "the model is not a pflatents checkpoint: its training rows are unknown"
        rec = data.get("holdout")
    except InputError as e:
        return None, f"cannot read the checkpoint's config: {str(e).splitlines()[0]}"
    if not rec:
        return None, "the checkpoint was trained on every row (no --holdout): no held-out rows to compare"
    if rec.get("fingerprint") != cfg.data.fingerprint:
        return None, "the checkpoint's training data differ from this store's data: its split does not apply"
    return rec, f"split recorded by the checkpoint: {rec['n_heldout']} held-out of {rec['n_samples']} rows"


def _split_rows(store: LatentStore, ranges: list[list[int]]) -> tuple[np.ndarray, np.ndarray] | None:
    """(train rows, held-out rows) among the analysed rows, when the model's split is known."""
    from pflatents.tasks.data.split import split_from_record

    rec, _ = model_split(store)
    if rec is None:
        return None
    train, held = split_from_record(rec)
    rows = usable_rows(ranges)
    return np.intersect1d(train, rows), np.intersect1d(held, rows)


def comparison_rows(store: LatentStore, ranges: list[list[int]], m: int, seed: int
                    ) -> tuple[np.ndarray, np.ndarray, str]:
    """(training rows, the rows decodes are compared with, what those are): the held-out rows when
    the model's split is known, else a seeded half of the rows (the others are the training side)."""
    split = _split_rows(store, ranges)
    rows = usable_rows(ranges)
    if split is not None and len(split[1]):
        return split[0], subsample(split[1], m, seed, 12), "held-out rows (not trained on)"
    held = subsample(rows, min(m, len(rows) // 2), seed, 12)
    return np.setdiff1d(rows, held), held, "data rows (the model may have trained on them)"


def reference_rows(train: np.ndarray, seed: int) -> np.ndarray:
    """The seeded training rows the nearest-neighbour distances are measured against."""
    return subsample(train, REFERENCE_ROWS, seed, 13)


@task(name="check_prior_decodes", cache_policy=NO_CACHE, persist_result=False)
def check_prior_decodes(store_url: str, ranges: list[list[int]], m: int, seed: int, alpha: float,
                        device: str = "auto") -> dict[str, Any]:
    """Decode ``m`` seeded prior draws; MMD, C2ST against held-out (or other) data rows and the
    nearest-neighbour ratio against the training rows. Keeps the first decodes for the report
    (at least 64; up to ~4 MB)."""
    import torch

    from pflatents.tasks.core import as_model
    from pflatents.tasks.ode.batches import decode_block

    store = LatentStore.open(store_url, mode="r+")
    cfg = pinned_config(store)
    sde = cfg.make_sde()
    source, why = store_data(store, ranges)
    if source is None:
        return {"skipped": why}
    try:
        model = load_model(cfg.model.spec, sde, precision=cfg.precision, compile=cfg.compile)
    except (InputError, OSError) as e:
        return {"skipped": f"the model cannot be loaded: {str(e).splitlines()[0]}"}
    train, held, against = comparison_rows(store, ranges, m, seed)
    if len(held) < 5 or len(train) < 1:
        return {"skipped": f"too few data rows to compare with ({len(held)} held out, {len(train)} reference)"}
    labels, conditioned = None, {}
    if as_model(model, sde).conditional:  # each draw under a class: the comparison rows' mix, or the pinned K
        labels, how = prior_labels(store.labels_at(held), m, seed, cfg.class_label)
        if labels is None:
            return {"skipped": how}
        conditioned = {"conditioned_on": how}
    gen = torch.Generator().manual_seed(int(seed))
    z = sde.prior_sample((m, *store.sample_shape), generator=gen).numpy()
    x, _, status = decode_block(model, sde, z, cfg.make_solver(), cfg.batch_size, resolve_device(device), cfg.dtype,
                                labels)
    ok = status == 0
    ref = read_rows(source, reference_rows(train, seed))
    out = realism(x[ok], read_rows(source, held), ref, source.quantization, seed, alpha)
    keep = min(m, max(64, KEEP_DECODE_VALUES // max(1, int(np.prod(store.sample_shape)))))
    arrays = {"prior_decodes": (x[:keep].reshape(keep, -1).astype(np.float32), ("decode", "value"))}
    if labels is not None:  # the class each kept decode was conditioned on
        arrays["prior_decode_labels"] = (labels[:keep], ("decode",))
    write_arrays(analysis_group(store, create=True), arrays)
    return {"m": int(m), "seed": int(seed), "compared_with": against, **conditioned,
            "n_decode_failures": int((~ok).sum()), **out}


def _figures(s: dict[str, Any]) -> dict[str, Any]:
    """The side-by-side figures of one row set."""
    nm, ind = s["normality"], s["independence"]
    return {"n": s["n_samples"], "max_abs_offdiag_corr": ind["max_abs_offdiag_corr"],
            "corr_threshold": ind["corr_threshold"], "gaussian_total_correlation": ind["gaussian_total_correlation"],
            "gaussian_total_correlation_null_mean": ind["gaussian_total_correlation_null_mean"],
            "max_abs_var_minus_1": nm["max_abs_var_minus_1"], "mean_abs_excess_kurtosis": nm["mean_abs_excess_kurtosis"],
            "n_dims_failing": nm["n_dims_failing"], "dependence_tests_rejecting": independence_failures(ind)}


@task(name="split_stats", cache_policy=NO_CACHE, persist_result=False)
def split_stats(store_url: str, ranges: list[list[int]], stats_cfg: dict[str, Any], prior_std: float,
                rows: int | None = None) -> dict[str, Any]:
    """The key statistics of the training rows and of the held-out rows, side by side (when known)."""
    store = LatentStore.open(store_url, mode="r")
    rec, note = model_split(store)
    split = _split_rows(store, ranges)
    if split is None or min(len(split[0]), len(split[1])) < 3:
        return {"known": False, "note": note if split is None else "fewer than 3 rows on one side"}
    cfg = StatsConfig(**stats_cfg)
    target = stored_target(store)
    x = latents_dask(store, ranges, rows) / prior_std
    pos = np.searchsorted(usable_rows(ranges), split[0]), np.searchsorted(usable_rows(ranges), split[1])
    out: dict[str, Any] = {"known": True, "note": note}
    for name, p in zip(("train", "heldout"), pos):
        res = compute_stats(x[p], cfg, shift=target.shift, matrix=target.matrix)
        out[name] = _figures(summarise(res, [], cfg))
    errors = recon_values(store)
    if "recon_max_abs" in errors:  # the round trip, split the same way
        for name, side in zip(("train", "heldout"), split):
            hit = np.isin(errors["sample_index"], side)
            out[name]["round_trip_n_checked"] = int(hit.sum())
            out[name]["round_trip_max_abs_error"] = float(errors["recon_max_abs"][hit].max()) if hit.any() else None
    out["eval_loss_train"], out["eval_loss_heldout"] = rec.get("eval_loss_train"), rec.get("eval_loss_heldout")
    return out
