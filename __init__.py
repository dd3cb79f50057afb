"""pflatents: probability-flow ODE latents for whole datasets.

The installed package maps the repository's folders under one name:
``pflatents.flows`` (Prefect flows, the coordinator and the CLI), ``pflatents.tasks`` (units of
work: the ODE core, models, data sources, training, analysis, and the thin Prefect task wrappers)
and ``pflatents.storage`` (the Zarr v3 latent store). This module is the small public API for
notebooks; the ``pflatents`` command calls the same functions (``extract``, ``resume``, ``analyze``).
Importing it is cheap: Prefect, torch and zarr load on the first call.

    import pflatents
    pflatents.extract("x.npy", "gmm:gmm.json", "latents.zarr", solver="rk4", steps=20)
    ds = pflatents.open_latents("latents.zarr")        # xarray.Dataset, dims (sample, dim)
    summary = pflatents.analyze("latents.zarr", reconstruct=100)
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["extract", "resume", "analyze", "open_latents", "ExtractionFailed"]


class ExtractionFailed(RuntimeError):
    """Some shards failed after their retries; the message names them and ``summary`` holds the figures.

    Run ``pflatents.resume(store)`` to retry them."""

    def __init__(self, message: str, summary: dict[str, Any]) -> None:
        super().__init__(message)
        self.summary = summary


def _split(settings: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(job settings, run settings) by field name; anything else is an InputError naming it."""
    from pflatents.flows.run import RunSettings
    from pflatents.tasks.config import JobSettings
    from pflatents.tasks.errors import InputError

    norm = {k.replace("-", "_"): v for k, v in settings.items()}
    unknown = sorted(set(norm) - set(JobSettings.model_fields) - set(RunSettings.model_fields))
    if unknown:
        raise InputError(f"unknown setting(s) {', '.join(unknown)}; known: "
                         f"{', '.join([*JobSettings.model_fields, *RunSettings.model_fields])}")
    job = {k: v for k, v in norm.items() if k in JobSettings.model_fields}
    run = {k: v for k, v in norm.items() if k in RunSettings.model_fields}
    return job, run


def _result(outcome) -> dict[str, Any]:
    summary = {**outcome.summary, "url": outcome.url, "message": outcome.message}
    if not outcome.ok:
        raise ExtractionFailed(outcome.message, summary)
    return summary


def extract(data: str, model: str, out: str, *, progress: bool = False, **settings: Any) -> dict[str, Any]:
    """Encode the dataset ``data`` with ``model`` into the Zarr store ``out`` (what `pflatents extract` does).

    ``settings`` are the job settings of ``pflatents.tasks.config.JobSettings`` (``sde``, ``t_eps``,
    ``solver``, ``rtol``, ``atol``, ``steps``, ``grid``, ``shard_size``, ``batch_size``, ``dtype``,
    ``incremental``, ...) and the run settings of ``pflatents.flows.run.RunSettings`` (``runner``,
    ``workers``, ``device``, ``retries``, ...), with the same defaults as the command's flags.
    An existing store with the same config is continued; another config is refused.

    Returns the run's summary: ``samples``, ``seconds``, ``samples_per_s``, ``mean_nfe`` (when
    shards ran), ``new``, ``shard_ids``, ``n_samples`` (published), ``url`` and a one-line ``message``.
    Raises ``ExtractionFailed`` when shards failed (their ids in the message), ``InputError`` /
    ``StoreError`` for bad input (nothing written).
    """
    from pflatents.flows.coordinator import Job
    from pflatents.flows.run import RunSettings, extract_job
    from pflatents.flows.server import prefect_env, prestart

    prefect_env()
    prestart()
    job, run = _split(settings)
    return _result(extract_job(Job.from_dict({"data": data, "model": model, "out": out, **job}),
                               RunSettings.from_dict(run), progress=progress))


def resume(store: str, *, progress: bool = False, **run: Any) -> dict[str, Any]:
    """Finish every shard of ``store`` that is not done, with its pinned config (`pflatents resume`).

    ``run`` are run settings (``runner``, ``workers``, ``device``, ``retries``, ...). Refused when the
    data or the model changed since the store was made. Returns and raises as ``extract``.
    """
    from pflatents.flows.run import RunSettings, resume_store
    from pflatents.flows.server import prefect_env, prestart

    prefect_env()
    prestart()
    return _result(resume_store(store, RunSettings.from_dict(run), progress=progress))


def analyze(store: str, **options: Any) -> dict[str, Any]:
    """Independence and normality statistics of the store's latents, and optionally the reconstruction
    check, the ICA comparison and a report (`pflatents analyze`); returns the JSON summary.

    ``options`` are the keywords of ``pflatents.flows.analyze.analyze_store`` (``reconstruct`` = N
    or ``"all"``, ``ica``, ``report`` = a directory, ``partial``, ``overwrite``, ``seed``, ...).
    The summary is also stored in the store's ``analysis`` group.
    """
    from pflatents.flows.analyze import analyze_store
    from pflatents.flows.server import prefect_env, prestart

    prefect_env()
    prestart()
    return analyze_store(store, **options)


def open_latents(path: str, *, rows: int | None = None, storage_options: dict | None = None):
    """The store's latents as a lazy ``xarray.Dataset`` (dask-backed), cut to the published samples.

    Variables: ``latents`` (dims ``sample`` and ``dim``, or ``sample, channel, height, width`` for
    images) and ``nfe`` (score evaluations per sample); attrs ``pflatents`` carry the pinned config,
    its hash and the package versions. Rows of shards that are not done read as NaN. ``rows`` is the
    dask chunk length (default: whole shards, about 128 MiB). Paths and fsspec URLs (``s3://...``,
    with ``storage_options``) are accepted.
    """
    from pflatents.flows.coordinator import store_url
    from pflatents.storage import LatentStore

    return LatentStore.open(store_url(str(path)), mode="r", storage_options=storage_options).open_xarray(rows)
