"""``pflatents demo`` (``run_demo``): the whole job on the embedded default (the 1797 sklearn digits).

1. train a small MLP score model on ``sklearn:digits`` -- cached under ``DIR/models/`` keyed by the
   hash of its training config and data fingerprint, so a rerun reuses it;
2. extract the latents of all 1797 digits to ``DIR/digits.zarr`` with the default solver (a completed
   store is left as it is: "nothing to do");
3. the analysis ``pflatents analyze DIR/digits.zarr --reconstruct all --ica --report DIR/report`` runs;
4. a short summary: where the model, store and report are, and the latents' headline figures.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

__all__ = ["run_demo", "demo_train_config", "DEFAULT_TRAIN_STEPS"]

DATA = "sklearn:digits"
DEFAULT_TRAIN_STEPS = 600  # ~1 min on 2 CPU threads; see benchmarks/README.md (digits quality) for the budget comparison


def demo_train_config(steps: int, seed: int = 0):
    """The demo's training settings: a 3-block, 256-wide residual MLP, batch 256, logSNR-uniform times."""
    from pflatents.tasks.training.train import TrainConfig

    return TrainConfig(arch="mlp", arch_params={"hidden": 256, "depth": 3}, steps=steps, batch_size=256, lr=2e-3,
                       seed=seed)


def _model_dir(out: Path, cfg, sde, src) -> Path:
    key = json.dumps({"train": cfg.to_dict(), "sde": sde.to_dict(), "data": src.fingerprint()}, sort_keys=True)
    return out / "models" / f"digits-mlp-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def _ensure_model(out: Path, steps: int, seed: int, progress: bool) -> tuple[Path, float, bool]:
    """The cached checkpoint for these settings, training it first when absent."""
    from pflatents.flows.train import run_train
    from pflatents.tasks.models.checkpoint import load_checkpoint
    from pflatents.tasks.errors import ModelError
    from pflatents.tasks.ode.sde import VPSDE
    from pflatents.tasks.data.sources import open_source

    src, sde = open_source(DATA), VPSDE()
    cfg = demo_train_config(steps, seed)
    mdir = _model_dir(out, cfg, sde, src)
    if mdir.is_dir():
        try:
            load_checkpoint(mdir, sde)
            print(f"[1/3] model: reusing {mdir}")
            return mdir, 0.0, True
        except ModelError as e:
            print(f"[1/3] model: cached checkpoint unusable ({e}); training again")
    print(f"[1/3] model: training a {cfg.arch_params['depth']}x{cfg.arch_params['hidden']} MLP on {DATA} "
          f"for {steps} steps")
    t0 = time.perf_counter()
    run_train(src.spec, str(mdir), cfg.to_dict(), sde.to_dict(), overwrite=mdir.exists(), progress=progress)
    return mdir, time.perf_counter() - t0, False


def run_demo(out: str | Path = "pflatents-demo", train_steps: int = DEFAULT_TRAIN_STEPS, seed: int = 0,
             progress: bool = True) -> int:
    """Train (or reuse), extract, analyse, summarise; returns the exit code."""
    from pflatents.flows.analyze import analyze_store
    from pflatents.flows.coordinator import Job
    from pflatents.flows.run import RunSettings, extract_job
    from pflatents.storage.errors import StoreError
    from pflatents.tasks.analysis.report import summary_table
    from pflatents.tasks.errors import InputError

    if train_steps < 1:
        raise InputError(f"--train-steps must be >= 1; got {train_steps}")
    out = Path(out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    mdir, t_train, reused = _ensure_model(out, train_steps, seed, progress)

    store, report = out / "digits.zarr", out / "report"
    print(f"[2/3] extract: {DATA} -> {store}")
    t0 = time.perf_counter()
    try:
        outcome = extract_job(Job(data=DATA, model=str(mdir), out=str(store)), RunSettings(), say=print,
                              progress=progress)
    except StoreError:
        print(f"pflatents demo: if {store} was made with another model, remove it or give another --out")
        raise
    t_extract = time.perf_counter() - t0
    if not outcome.ok:
        print(f"pflatents demo: extraction incomplete: {outcome.message}")
        return 1
    print(outcome.message)

    t0 = time.perf_counter()
    print(f"[3/3] analyze: --reconstruct all --ica --report {report}")
    summary = analyze_store(str(store), reconstruct="all", ica=True, report=str(report), progress=progress)
    print(summary_table(summary))
    print(f"report: {summary['report']['html']}")
    t_analyze = time.perf_counter() - t0
    _summary(mdir, store, report, reused, t_train, t_extract, t_analyze, time.perf_counter() - t_start)
    return 0


def _summary(mdir: Path, store: Path, report: Path | None, reused: bool, t_train: float, t_extract: float,
             t_analyze: float, total: float) -> None:
    import numpy as np

    from pflatents.storage import LatentStore

    z = np.asarray(LatentStore.open(str(store), mode="r").latents_array()[:], dtype=np.float64)
    z = z.reshape(z.shape[0], -1)
    var = z.var(0)
    live = var > 1e-3  # constant pixels have constant latents (docs/math.md: lam << sigma(t_eps)^2)
    r = np.corrcoef(z[:, live], rowvar=False)
    off = np.abs(r - np.eye(r.shape[0])).max() if r.ndim == 2 else 0.0
    print()
    print("pflatents demo: done")
    print(f"  model    {mdir}  ({'reused' if reused else f'trained in {t_train:.0f} s'})")
    print(f"  store    {store}  ({z.shape[0]} latents x {z.shape[1]} dims, extracted in {t_extract:.0f} s)")
    if report is not None:
        print(f"  report   {report / 'report.html'}  (analysis {t_analyze:.0f} s)")
    print(f"  latents  max |mean| {np.abs(z.mean(0)).max():.3f}; over the {int(live.sum())} non-constant dims: "
          f"max |var - 1| {np.abs(var[live] - 1).max():.3f}, max |offdiag corr| {off:.3f}; "
          f"{int((~live).sum())} constant pixels give ~0 latents")
    print(f"  total    {total:.0f} s")
