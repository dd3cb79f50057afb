"""Analysis of a store (what `pflatents analyze STORE` runs): the three answers (realism of prior
decodes, bijection, independence vs ICA) from the statistics, reconstruction, prior decodes, ICA, report.

``analyze_store`` validates everything (store, shards, settings, stored analysis) before Prefect
starts, then runs the ``analyze`` flow: one dask pass for the statistics, reconstruction chunks mapped on the same
runners as extraction, the ICA comparison, a Prefect markdown artifact, and the report.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["AnalyzeOptions", "analyze_store"]  # + the flow `analyze` (built on first use)


@dataclass(frozen=True)
class AnalyzeOptions:
    """What decides an analysis's results (the dask chunking does not: results are chunk-invariant)."""

    stats: dict = field(default_factory=dict)
    reconstruct: int | str | None = None
    ica: bool = False
    ica_n: int = 20000
    sources: str | None = None
    partial: bool = False
    prior: int = 300             # decodes of fresh prior draws for the realism tests (0: skip)
    stability: int = 0           # stored samples re-encoded ~10x more accurately (0: skip)

    def to_dict(self) -> dict[str, Any]:
        return {"stats": self.stats, "reconstruct": self.reconstruct, "ica": self.ica,
                "ica_n": self.ica_n if self.ica else None, "sources": self.sources, "partial": self.partial,
                "prior": self.prior, **({"stability": self.stability} if self.stability else {})}


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


def _options(n_samples: int, *, reconstruct, ica, ica_samples, sources, partial, seed, alpha, dcor_pairs, rows,
             workers, prior=300) -> AnalyzeOptions:
    from pflatents.tasks.analysis.stats import StatsConfig
    from pflatents.tasks.errors import InputError

    try:
        stats = StatsConfig(alpha=alpha, dcor_pairs=dcor_pairs, seed=seed)
    except ValueError as e:
        raise InputError(str(e)) from None
    if ica_samples < 2 or workers < 1 or (rows is not None and rows < 1):
        raise InputError("--ica-samples must be >= 2, --workers >= 1 and --rows >= 1")
    if sources and not ica:
        raise InputError("--sources is used by the ICA comparison: add --ica")
    if isinstance(prior, bool) or not isinstance(prior, int) or prior < 0 or prior == 1:
        raise InputError(f"--prior takes a number of prior draws to decode, 0 (skip) or >= 2; got {prior!r}")
    return AnalyzeOptions(stats=stats.to_dict(), reconstruct=_reconstruct_arg(reconstruct), ica=ica,
                          ica_n=ica_samples, sources=_sources_arg(sources, n_samples), partial=partial, prior=prior)


def _check_inputs(store: Any, opts: AnalyzeOptions, device: str) -> None:
    """The data (and the model) must open when reconstruction or ICA needs them."""
    from pflatents.tasks.config import ExtractConfig
    from pflatents.tasks.models.registry import load_model, resolve_device
    from pflatents.tasks.data.sources import open_pinned

    cfg = ExtractConfig.from_store(store)
    if opts.reconstruct or opts.ica:
        open_pinned(cfg.data)
    if opts.reconstruct:
        load_model(cfg.model.spec, cfg.make_sde())
        resolve_device(device)


# ---- the flow --------------------------------------------------------------------------------

def _recon_names(store: Any) -> list[str]:
    """Per-sample arrays the reconstruction writes for this store's data and model."""
    from pflatents.tasks.wrappers.analyze import RECON_ARRAYS, pinned_config
    from pflatents.tasks.models.registry import load_model
    from pflatents.tasks.analysis.reconstruct import gaussian_params
    from pflatents.tasks.data.sources import open_pinned

    cfg = pinned_config(store)
    names = list(RECON_ARRAYS)
    if open_pinned(cfg.data).quantization is not None:
        names.append("recon_requantised_exact")
    if gaussian_params(load_model(cfg.model.spec, cfg.make_sde())) is not None:
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


def _rows_note(store: Any, ranges: list[list[int]], partial: bool, n_flagged: int = 0) -> str:
    used = sum(b - a for a, b in ranges)
    flagged = (f"; {n_flagged} samples the solver flagged (NaN latents) are left out" if n_flagged else "")
    if used + n_flagged == store.n_samples:
        return ("all samples" if not n_flagged else f"{used} of {store.n_samples} samples") + flagged
    return (f"--partial: only the done shards were used, {used} of {store.n_samples} samples; "
            f"the rest are pending or failed") + flagged


def _make_flow() -> Any:
    from prefect import flow

    from pflatents.flows import dashboard
    from pflatents.flows.progress import step_done

    @flow(name="analyze", persist_result=False, log_prints=True)
    @dashboard.tasks_untagged
    def analyze(store_url: str, options: dict, ranges: list, device: str = "auto", rows: int | None = None,
                report: str | None = None, n_flagged: int = 0) -> dict:
        """Statistics, reconstruction, ICA and report of one store; returns the JSON summary."""
        from prefect.artifacts import create_markdown_artifact

        from pflatents.tasks.config import ExtractConfig
        from pflatents.storage import LatentStore
        from pflatents.storage.analysis import analysis_group, reset_analysis, write_analysis_attrs
        from pflatents.storage.config import to_json
        from pflatents.tasks.analysis.answers import answers
        from pflatents.tasks.analysis.report import artifact_markdown
        from pflatents.tasks.analysis.summary import verdict
        from pflatents.tasks.wrappers.analyze import compare_ica, compute_latent_stats
        from pflatents.tasks.wrappers.report import write_analysis_report
        from pflatents.tasks.wrappers.realism import check_prior_decodes, split_stats

        opts = AnalyzeOptions(**{**options, "ica_n": options.get("ica_n") or 20000})
        store = LatentStore.open(store_url, mode="r+")
        prior_std = float(ExtractConfig.from_store(store).make_sde().prior_std)
        reset_analysis(store)
        summary = compute_latent_stats(store_url, ranges, opts.stats, prior_std, rows)
        step_done("statistics")
        summary["reconstruction"] = (_reconstruct(store, ranges, opts, device) if opts.reconstruct
                                     else {"max_abs_error": None, "rmse": None})
        if opts.reconstruct:
            step_done("reconstruction")
        if opts.ica:
            summary["ica"] = compare_ica(store_url, ranges, opts.stats, opts.ica_n, opts.sources, prior_std)
            step_done("ICA")
        seed, alpha = int(opts.stats.get("seed", 0)), float(opts.stats.get("alpha", 0.05))
        summary["prior"] = (check_prior_decodes(store_url, ranges, opts.prior, seed, alpha, device) if opts.prior
                            else {"skipped": "--prior 0"})
        if opts.prior:
            step_done("prior decodes")
        summary["splits"] = split_stats(store_url, ranges, opts.stats, prior_std, rows)
        step_done("splits")
        if opts.stability:
            from pflatents.tasks.wrappers.stability import check_stability

            summary["stability"] = check_stability(store_url, ranges, opts.stability, seed, device)
            step_done("stability")
        summary.update(store=store_url, n_samples_store=store.n_samples, prior_std=prior_std,
                       rows_note=_rows_note(store, ranges, opts.partial, n_flagged), partial=opts.partial,
                       n_flagged_excluded=n_flagged)
        summary["verdict"] = verdict(summary)
        if opts.stability:
            st = summary["stability"]
            summary["verdict"] += (f" Latent stability: p99 drift {st['p99']:.2g} vs a 10x more accurate re-encode "
                                   f"({'meets' if st['meets_target'] else 'MISSES'} the target {st['target']:g}).")
        summary = to_json({"answers": answers(summary), **summary}, "analysis summary", nonfinite="null")
        write_analysis_attrs(analysis_group(store, create=True), opts.to_dict(), summary)
        if report:
            summary["report"] = write_analysis_report(store_url, ranges, summary, report, prior_std, device,
                                                      int(opts.stats.get("seed", 0)))
            step_done("report")
        dashboard.publish(create_markdown_artifact, markdown=artifact_markdown(summary, summary.get("report")),
                          key="pflatents-analysis", description=f"pflatents analysis of {store_url}: the three answers")
        dashboard.log_analysis(summary)
        dashboard.hand_over(store_url, summary)
        return summary

    return analyze


def __getattr__(name: str) -> Any:
    """``pflatents.flows.analyze.analyze`` builds the flow on first use (keeps the CLI import light)."""
    if name == "analyze":
        return _make_flow()
    raise AttributeError(name)


def analyze_store(store: str, *, reconstruct: int | str | None = None, ica: bool = False, ica_samples: int = 20000,
                  sources: str | None = None, report: str | None = None, partial: bool = False,
                  overwrite: bool = False, seed: int = 0, alpha: float = 0.05, dcor_pairs: int = 8,
                  rows: int | None = None, runner: str = "local", workers: int = 1, device: str = "auto",
                  prior: int = 300, stability: int = 0, progress: bool = False) -> dict:
    """Validate everything before Prefect starts, run the ``analyze`` flow, return its JSON summary.

    With ``progress``, a bar on stderr counts the analysis' steps as they end.

    The summary opens with the three answers (``answers``: realism, bijection, independence); ``prior``
    seeded prior draws are decoded and compared with the data (0 skips; skipped with a reason when
    the model or data cannot be loaded). The summary is also written to the store's ``analysis``
    group; ``report`` (a directory) gets report.html, report.md and PNG plots. A store with pending or failed shards is refused unless
    ``partial``; a stored analysis made with other settings is kept unless ``overwrite``.
    """
    from pflatents.flows.coordinator import store_url
    from pflatents.flows.server import prefect_env, use_server
    from pflatents.storage import LatentStore
    from pflatents.storage.analysis import check_analysis_config, done_ranges

    url = store_url(store)
    st = LatentStore.open(url, mode="r+")
    from pflatents.tasks.wrappers.analyze import drop_flagged

    ranges, n_flagged = drop_flagged(st, [list(r) for r in done_ranges(st, partial)])
    opts = _options(st.n_samples, reconstruct=reconstruct, ica=ica, ica_samples=ica_samples, sources=sources,
                    partial=partial, seed=seed, alpha=alpha, dcor_pairs=dcor_pairs, rows=rows, workers=workers,
                    prior=prior)
    if isinstance(stability, bool) or not isinstance(stability, int) or stability < 0:
        from pflatents.tasks.errors import InputError

        raise InputError(f"--stability takes a number of samples >= 0; got {stability!r}")
    if stability:
        from dataclasses import replace

        opts = replace(opts, stability=stability)
    check_analysis_config(st, opts.to_dict(), overwrite)
    _check_inputs(st, opts, device)
    prefect_env()
    api_url = use_server()
    from pflatents.flows.extract import make_runner

    from pflatents.flows import dashboard

    flow = _make_flow().with_options(task_runner=make_runner(runner, workers),
                                     flow_run_name=dashboard.run_name(f"analyze {dashboard.store_name(url)}"))
    kwargs = dict(store_url=url, options=opts.to_dict(), ranges=ranges, device=device, rows=rows,
                  report=str(Path(report).expanduser().resolve()) if report else None, n_flagged=n_flagged)
    from pflatents.flows import progress as prog

    n_steps = 2 + sum(map(bool, (opts.reconstruct, opts.ica, opts.prior, opts.stability, report)))
    with prog.bar(n_steps, "analyzing", disabled=not progress, fields=("step",)) as update:
        done = [0]

        def hook(name: str) -> None:
            done[0] += 1
            update(completed=done[0], step=name)  # absolute: a throttled update loses no step
        prog.steps.append(hook)
        try:
            return dashboard.run_watched(flow, kwargs, url, dashboard.run_tags(url, st.config["model"].get("kind")),
                                         "analysis", f"`pflatents analyze {url}` again", api_url)
        finally:
            prog.steps.remove(hook)
