"""The ``--latent-tol`` pilot as a step of the job (thin Prefect wrapper; the logic is
``pflatents.tasks.ode.pilot``).

A store made with ``--latent-tol E`` pins a pending pilot record (``pilot.pending_record``) and a
placeholder solver; the extract flow runs ``run_pilot`` before any shard: it loads the pinned model
(at the pinned precision, and in float64 for the reference), draws the two seeded pilot subsets of the
pinned data, runs the pilot and pins its choice and curve in the store (``LatentStore.pin_config``,
fenced on the coordinator's lock). Shards then read the chosen solver from the pinned config like any
other; a resume finds the pilot done and does not run it again.

``hooks``: process-local callbacks ``(done, total, what)`` told of the pilot's progress (the CLI's
progress bar registers one; the task runs in the flow's process).
"""

from __future__ import annotations

import time
from typing import Callable

from prefect import task
from prefect.cache_policies import NO_CACHE

from pflatents.storage import LatentStore
from pflatents.tasks.models.registry import load_model, resolve_device
from pflatents.tasks.ode import pilot

__all__ = ["hooks", "run_name", "pin_pilot", "run_pilot"]

hooks: list[Callable[[int, int, str], None]] = []


def run_name(target: float) -> str:
    """The pilot's task-run name in the dashboard (``pilot: latent-tol 0.001``)."""
    return f"pilot: latent-tol {target:g}"


def _progress(done: int, total: int, what: str) -> None:
    for hook in list(hooks):
        hook(done, total, what)


def pin_pilot(store_url: str, device: str = "auto", lease: str | None = None) -> dict:
    """Run the pending pilot of the store's pinned job and pin its choice and record; returns the record
    (the pinned one, without running anything, when the pilot is not pending)."""
    from pflatents.tasks.config import ExtractConfig
    from pflatents.tasks.data.sources import open_pinned

    store = LatentStore.open(store_url)
    store.fence(lease)
    cfg = ExtractConfig.from_store(store)
    if not pilot.pending(cfg.pilot):
        return dict(cfg.pilot or {})
    t0 = time.perf_counter()
    sde, dev = cfg.make_sde(), resolve_device(device)
    work = load_model(cfg.model.spec, sde, precision=cfg.precision, compile=cfg.compile)
    hi = load_model(cfg.model.spec, sde, precision="fp64")
    src = open_pinned(cfg.data)
    fit, held = pilot.pilot_subsets(src)
    conditional = work.conditional
    fit = (fit[0], cfg.cond_labels(fit[1], len(fit[0])) if conditional else None)
    held = held if held[0] is None else (held[0], cfg.cond_labels(held[1], len(held[0])) if conditional else None)
    choice, rec = pilot.latent_pilot(work, hi, sde, fit, held, cfg.make_solver(), cfg.dtype, cfg.pilot["target"],
                                     dev, progress=_progress)
    new = ExtractConfig.from_dict({**cfg.to_dict(), "solver": choice.to_dict(), "pilot": rec}, store.format_version)
    store.pin_config(new.to_dict())
    return {**rec, "seconds": time.perf_counter() - t0}


@task(name="pilot", cache_policy=NO_CACHE, persist_result=False)
def run_pilot(store_url: str, device: str = "auto", lease: str | None = None) -> dict:
    """The pilot step of an extract flow (``pin_pilot``); logs what it chose."""
    from prefect.logging import get_run_logger

    rec = pin_pilot(store_url, device, lease)
    get_run_logger().info(pilot.describe(rec) + (f" in {rec['seconds']:.1f} s" if "seconds" in rec else ""))
    return rec
