"""`analyze --stability N` as a thin Prefect task: re-encode N seeded stored samples ~10x more accurately.

The pinned model, precision, dtype and t_eps are kept; only the solver setting is tightened
(``pflatents.tasks.analysis.stability.tighter``), or with ``float64`` the network and state run in
float64 too. The target is the store's pinned ``--latent-tol`` when it has one, else 1e-3.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE

from pflatents.storage import LatentStore
from pflatents.tasks.analysis.reconstruct import read_rows, subset_indices
from pflatents.tasks.analysis.stability import drift, tighter
from pflatents.tasks.data.sources import open_pinned
from pflatents.tasks.models.registry import load_model, resolve_device
from pflatents.tasks.ode.batches import encode_block
from pflatents.tasks.wrappers.analyze import cond_labels, pinned_config, read_latents, usable_rows

__all__ = ["check_stability"]


@task(name="check_stability", cache_policy=NO_CACHE, persist_result=False)
def check_stability(store_url: str, ranges: list[list[int]], n: int, seed: int = 0, device: str = "auto",
                    float64: bool = False) -> dict[str, Any]:
    """Per-sample latent drift of ``n`` seeded stored samples against a ~10x more accurate re-encode."""
    store = LatentStore.open(store_url, mode="r")
    cfg = pinned_config(store)
    index = subset_indices(usable_rows(ranges), n, seed)
    source, sde = open_pinned(cfg.data), cfg.make_sde()
    precision, dtype = ("fp64", "float64") if float64 else (cfg.precision, cfg.dtype)
    model = load_model(cfg.model.spec, sde, precision=precision, compile=cfg.compile)
    solver = tighter(cfg.make_solver())
    again, _, status = encode_block(model, sde, read_rows(source, index), solver, cfg.batch_size,
                                    resolve_device(device), dtype, cond_labels(store, cfg, index))
    target = (cfg.pilot or {}).get("target")
    out = drift(read_latents(store, index), again, index, target)
    out.update(setting=solver.to_dict(), precision=precision, dtype=dtype, failed=int((status != 0).sum()),
               target_source="--latent-tol pinned" if target is not None else "default 1e-3")
    return out
