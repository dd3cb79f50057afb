"""``pflatents analyze STORE``: independence and normality statistics, reconstruction, ICA, report.

The CLI validates everything (store, shards, settings, stored analysis) before Prefect starts, then
runs the ``analyze`` flow: one dask pass for the statistics, reconstruction chunks mapped on the same
runners as extraction, the ICA comparison, a Prefect markdown artifact, and the report.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["register", "AnalyzeOptions", "analyze", "cmd_analyze"]


@dataclass(frozen=True)
class AnalyzeOptions:
    """What decides an analysis's results (the dask chunking does not: results are chunk-invariant)."""

    stats: dict = field(default_factory=dict)
    reconstruct: int | str | None = None
    ica: bool = False
    ica_n: int = 20000
    sources: str | None = None
    partial: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"stats": self.stats, "reconstruct": self.reconstruct, "ica": self.ica,
                "ica_n": self.ica_n if self.ica else None, "sources": self.sources, "partial": self.partial}


def register(subparsers: Any) -> dict[str, Any]:
    """Add the ``analyze`` subcommand; returns {"analyze": handler}."""
    p = subparsers.add_parser("analyze", help="independence/normality statistics, reconstruction check, ICA")
    p.add_argument("store")
    p.add_argument("--reconstruct", default=None, help="N (a seeded subset) or all: decode and compare")
    p.add_argument("--ica", action="store_true", help="compare with FastICA on the data")
    p.add_argument("--ica-samples", type=int, default=20000, help="rows of the seeded ICA subsample")
    p.add_argument("--sources", default=None, help="known sources (.npy, N x D) for Amari distances")
    p.add_argument("--report", default=None, help="write report.html, report.md and PNGs into DIR")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--partial", action="store_true", help="analyse only the done shards of an incomplete store")
    p.add_argument("--overwrite", action="store_true", help="replace a stored analysis made with other settings")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--alpha", type=float, default=0.05)
    p.add_argument("--dcor-pairs", type=int, default=8)
    p.add_argument("--rows", type=int, default=None, help="rows per dask chunk (default: ~32 MiB of latents; results do not depend on it)")
    p.add_argument("--runner", default="local", help="local | dask | dask://HOST:PORT (reconstruction)")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--device", default="auto")
    return {"analyze": cmd_analyze}


# ---- validation (before Prefect) -------------------------------------------------------------

def _reconstruct_arg(value: str | None) -> int | str | None:
    from pflatents.tasks.errors import InputError

    if value is None or value == "all":
        return value
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise InputError(f"--reconstruct takes a number of samples >= 1 or 'all'; got {value!r}")
    return n


def _sources_arg(path: str | None, n_samples: int) -> str | None:
    from pflatents.tasks.errors import DataError

    if path is None:
        return None
    p = Path(path).expanduser().resolve()
    try:
        arr = __import__("numpy").load(p, mmap_mode="r")
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read --sources {p}: {e}") from None
    if arr.ndim != 2 or len(arr) != n_samples:
        raise DataError(f"--sources {p} must be a 2-D array with one row per sample ({n_samples}); "
                        f"got shape {arr.shape}")
    return str(p)


def _options(a: argparse.Namespace, n_samples: int) -> AnalyzeOptions:
    from pflatents.tasks.errors import InputError
    from pflatents.tasks.analysis.stats import StatsConfig

    try:
        stats = StatsConfig(alpha=a.alpha, dcor_pairs=a.dcor_pairs, seed=a.seed)
    except ValueError as e:
        raise InputError(str(e)) from None
    if a.ica_samples < 2 or a.workers < 1 or (a.rows is not None and a.rows < 1):
        raise InputError("--ica-samples must be >= 2, --workers >= 1 and --rows >= 1")
    if a.sources and not a.ica:
        raise InputError("--sources is used by the ICA comparison: add --ica")
    return AnalyzeOptions(stats=stats.to_dict(), reconstruct=_reconstruct_arg(a.reconstruct), ica=a.ica,
                          ica_n=a.ica_samples, sources=_sources_arg(a.sources, n_samples), partial=a.partial)


def _check_inputs(store: Any, opts: AnalyzeOptions, device: str) -> None:
    """The data (and the model) must open when reconstruction or ICA needs them."""
    from pflatents.tasks.config import ExtractConfig
    from pflatents.tasks.models.registry import load_model, resolve_device
    from pflatents.tasks.data.sources import open_source

    cfg = ExtractConfig.from_dict(store.config)
    if opts.reconstruct or opts.ica:
        open_source(cfg.data["spec"])
    if opts.reconstruct:
        load_model(cfg.model["spec"], cfg.make_sde())
        resolve_device(device)


# ---- the flow --------------------------------------------------------------------------------

def _json_safe(v: Any) -> Any:
    """Non-finite floats -> None, numpy scalars -> Python, recursively."""
    if isinstance(v, dict):
        return {str(k): _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    if hasattr(v, "item") and not isinstance(v, (str, bytes)):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _recon_names(store: Any) -> list[str]:
    """Per-sample arrays the reconstruction writes for this store's data and model."""
    from pflatents.tasks.wrappers.analyze import RECON_ARRAYS, _config
    from pflatents.tasks.models.registry import load_model
    from pflatents.tasks.analysis.reconstruct import gaussian_params
    from pflatents.tasks.data.sources import open_source

    cfg = _config(store)
    names = list(RECON_ARRAYS)
    if open_source(cfg.data["spec"]).quantization is not None:
        names.append("recon_requantised_exact")
    if gaussian_params(load_model(cfg.model["spec"], cfg.make_sde())) is not None:
        names += ["encode_max_abs", "encode_rmse"]
    return names


def _reconstruct(store: Any, ranges: list[list[int]], opts: AnalyzeOptions, device: str) -> dict[str, Any]:
    """Map decode chunks over a seeded subset (or all rows); summarise the stored errors."""
    import numpy as np

    from pflatents.storage.analysis import analysis_group, create_sample_arrays
    from pflatents.tasks.wrappers.analyze import reconstruct_chunk, recon_values, usable_rows
    from pflatents.tasks.analysis.reconstruct import error_summary, subset_indices

    n = None if opts.reconstruct == "all" else int(opts.reconstruct)  # type: ignore[arg-type]
    index = subset_indices(usable_rows(ranges), n, int(opts.stats.get("seed", 0)))
    chunk = max(1, min(len(index), store.shard_size))
    create_sample_arrays(analysis_group(store, create=True), index, chunk, _recon_names(store))
    futures = [reconstruct_chunk.submit(store.url, cid, device) for cid in range(-(-len(index) // chunk))]
    for fut in futures:
        fut.result()
    values = recon_values(store)
    out = error_summary(np.asarray(values["sample_index"]), values)
    out["note"] = "round-trip error understates encode error (errors partly cancel)"
    return out


def _rows_note(store: Any, ranges: list[list[int]], partial: bool) -> str:
    used = sum(b - a for a, b in ranges)
    if used == store.n_samples:
        return "all samples"
    return (f"--partial: only the done shards were used, {used} of {store.n_samples} samples; "
            f"the rest are pending or failed")


def _make_flow() -> Any:
    from prefect import flow

    @flow(name="analyze", persist_result=False, log_prints=True)
    def analyze(store_url: str, options: dict, ranges: list, device: str = "auto", rows: int | None = None,
                report: str | None = None) -> dict:
        """Statistics, reconstruction, ICA and report of one store; returns the JSON summary."""
        from prefect.artifacts import create_markdown_artifact

        from pflatents.tasks.config import ExtractConfig
        from pflatents.storage import LatentStore
        from pflatents.storage.analysis import analysis_group, reset_analysis, write_analysis_attrs
        from pflatents.tasks.wrappers.analyze import compare_ica, compute_latent_stats, write_analysis_report
        from pflatents.tasks.analysis.report import summary_table
        from pflatents.tasks.analysis.stats import verdict

        opts = AnalyzeOptions(**{**options, "ica_n": options.get("ica_n") or 20000})
        store = LatentStore.open(store_url, mode="r+")
        prior_std = float(ExtractConfig.from_dict(store.config).make_sde().prior_std)
        reset_analysis(store)
        summary = compute_latent_stats(store_url, ranges, opts.stats, prior_std, rows)
        summary["reconstruction"] = (_reconstruct(store, ranges, opts, device) if opts.reconstruct
                                     else {"max_abs_error": None, "rmse": None})
        if opts.ica:
            summary["ica"] = compare_ica(store_url, ranges, opts.stats, opts.ica_n, opts.sources, prior_std)
        summary.update(store=store_url, n_samples_store=store.n_samples, prior_std=prior_std,
                       rows_note=_rows_note(store, ranges, opts.partial), partial=opts.partial)
        summary["verdict"] = verdict(summary)
        summary = _json_safe(summary)
        write_analysis_attrs(analysis_group(store, create=True), opts.to_dict(), summary)
        create_markdown_artifact(markdown=summary_table(summary), key="pflatents-analysis",
                                 description=f"pflatents analysis of {store_url}")
        if report:
            summary["report"] = write_analysis_report(store_url, ranges, summary, report, prior_std, device,
                                                      int(opts.stats.get("seed", 0)))
        return summary

    return analyze


def __getattr__(name: str) -> Any:
    """``pflatents.flows.analyze.analyze`` builds the flow on first use (keeps the CLI import light)."""
    if name == "analyze":
        return _make_flow()
    raise AttributeError(name)


def cmd_analyze(a: argparse.Namespace) -> int:
    """Validate, run the flow, print the summary (JSON or a table)."""
    from pflatents.flows.cli import _prefect_env, _store_url
    from pflatents.storage import LatentStore
    from pflatents.storage.analysis import check_analysis_config, done_ranges

    url = _store_url(a.store)
    store = LatentStore.open(url, mode="r+")
    ranges = [list(r) for r in done_ranges(store, a.partial)]
    opts = _options(a, store.n_samples)
    check_analysis_config(store, opts.to_dict(), a.overwrite)
    _check_inputs(store, opts, a.device)
    _prefect_env()
    from pflatents.flows.extract import make_runner

    flow = _make_flow().with_options(task_runner=make_runner(a.runner, a.workers))
    summary = flow(store_url=url, options=opts.to_dict(), ranges=ranges, device=a.device, rows=a.rows,
                   report=str(Path(a.report).expanduser().resolve()) if a.report else None)
    if a.json:
        print(json.dumps(summary, indent=2))
    else:
        from pflatents.tasks.analysis.report import summary_table

        print(summary_table(summary))
        if a.report:
            print(f"report: {summary['report']['html']}")
    sys.stdout.flush()
    return 0
