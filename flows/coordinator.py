"""One extraction job, shared by `pflatents extract`, `resume` and scheduled runs (`serve`).

The steps every entry point takes: validate the inputs (before any lock or Prefect) -> lock the
store -> open or create it, and for a growing source check the extracted prefix and grow the plan
-> run the extract flow over the pending shards (earlier failures first, then new ones) -> publish
the new sample count. Only this coordinator resizes arrays or rewrites the store attrs; tasks write
their own shards.
"""

from __future__ import annotations

import contextlib
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from pflatents.tasks.config import ExtractConfig, JobSettings, build_config, job_batch_size
from pflatents.storage import (
    LatentStore,
    NotAStoreError,
    StoreError,
    StoreLockedError,
    default_shard_size,
    open_or_create,
    store_kind,
    store_lock,
)
from pflatents.tasks.errors import InputError
from pflatents.tasks.data.registry import absolute_spec, source_kind
from pflatents.tasks.data.sources import Source, open_source

__all__ = ["Job", "Prepared", "prepare", "make_store", "upgraded", "grow_to_source", "check_source", "locked", "bitwise_caveats",
           "data_spec", "model_spec", "store_url"]


class Job(JobSettings):
    """What to extract and how: the job settings (``pflatents.tasks.config.JobSettings``, the one list
    of them and their defaults) of `extract` flags, a `serve` job file or ``pflatents.extract``."""

    def resolved(self) -> Job:
        """The job with local paths made absolute (runs may start in another directory)."""
        return self.model_copy(update={"data": data_spec(self.data), "model": model_spec(self.model),
                                       "out": store_url(self.out)})


def store_url(out: str) -> str:
    return out if "://" in out else str(Path(out).expanduser().resolve())


def data_spec(spec: str) -> str:
    """Make local paths absolute (images:DIR and npydir:DIR too), so a resume from another directory finds the data."""
    return absolute_spec(spec)


def model_spec(spec: str) -> str:
    """Make the path in a model spec absolute (``kind:PATH`` and checkpoint dirs)."""
    from pflatents.tasks.models.registry import absolute_model_spec

    return absolute_model_spec(spec)


@dataclass(frozen=True)
class Prepared:
    """A validated job: its source, its frozen config and the store URL."""

    job: Job
    url: str
    src: Source
    cfg: ExtractConfig
    shard_size: int

    @property
    def incremental(self) -> bool:
        return bool(self.cfg.data.incremental)


def prepare(job: Job) -> Prepared:
    """Validate the job against its data and model (nothing written, no lock, no Prefect).

    A growing source (``npydir:``) is always incremental. Incremental jobs scan only new samples
    for NaN/Inf, under the lock (``grow_to_source``); fixed jobs scan everything here. Without an
    explicit shard size (batch size) an existing store keeps the one it was made with (the default depends on
    the data's length, which grows); a new store gets chunks of ~8 MiB, clipped to N, and at least one
    batch (``batch_size`` samples; a GPU needs batches of thousands, 682 samples of 32x32x3 fill 8 MiB),
    so every shard task integrates full batches.
    """
    src = open_data(job)
    incremental = job.incremental or source_kind(src.spec)[0].growing
    if not incremental:
        src.check_finite()
    url = store_url(job.out)
    pinned = _pinned_config(url)  # --latent-tol reuses its pilot; --compile auto takes the store's mode
    shard_size = job.shard_size
    if shard_size is None:
        shard_size = _pinned_shard_size(url) or max(default_shard_size(_sample_nbytes(src), len(src)),
                                                    min(job_batch_size(job, pinned), len(src)))
    cfg = build_config(job, source=src, shard_size=shard_size, incremental=incremental, pinned=pinned)
    return Prepared(job=job, url=url, src=src, cfg=cfg, shard_size=shard_size)


def open_data(job: Job) -> Source:
    """The job's source with its options. An image source without ``--channels`` takes grey images when
    the model's dimension is that of one channel (and not of three): RGB or grey as the model expects."""
    options = job.source_options()
    src = open_source(data_spec(job.data), **options)
    if "channels" in options or "channels" not in source_kind(src.spec)[0].options or src.sample_shape[0] != 3:
        return src
    from pflatents.tasks.config import job_sde
    from pflatents.tasks.models.registry import model_info

    try:
        dim = model_info(model_spec(job.model), job_sde(job)).dim
    except InputError:
        return src  # build_config names the model's problem
    per_channel = _sample_nbytes(src) // 4 // 3
    if dim is not None and dim == per_channel:
        return open_source(data_spec(job.data), **options, channels=1)
    return src


def _sample_nbytes(src: Source) -> int:
    """Bytes of one float32 latent sample."""
    n = 4
    for d in src.sample_shape:
        n *= d
    return n


def _pinned_shard_size(url: str) -> int | None:
    """The shard size of the store at ``url`` if one is there (read without the lock: a hint only,
    the pinned config is checked again under the lock)."""
    if store_kind(url) != "complete":
        return None
    try:
        return LatentStore.open(url, mode="r").shard_size
    except StoreError:
        return None


def _pinned_config(url: str) -> dict | None:
    """The pinned config of the store at ``url`` if one is there (a hint read without the lock, like the
    shard size: the config is checked again under the lock)."""
    if store_kind(url) != "complete":
        return None
    try:
        return LatentStore.open(url, mode="r").config
    except StoreError:
        return None


def make_store(p: Prepared) -> LatentStore:
    """Open the job's store if its pinned config matches, else create it. Call under the store lock.

    A fixed-length store whose data grew (the first N samples unchanged, by the pinned fingerprint)
    is refused with what to do, or, when the job is incremental, becomes an incremental store: its
    latents are kept and the next growth step appends the new samples.
    """
    if store_kind(p.url) != "complete":
        prefix = None
        if p.incremental:
            p.src.check_finite()
            prefix = {"n": len(p.src), "fingerprint": p.src.fingerprint()}
        return open_or_create(p.url, config=p.cfg.to_dict(), n_samples=len(p.src),
                              sample_shape=p.cfg.latent_shape, shard_size=p.shard_size, data_prefix=prefix,
                              sample_ids=True, labels=p.src.has_labels)
    store = LatentStore.open(p.url, mode="r+")
    if store.incremental and not p.incremental:
        raise InputError(f"{p.url} is an incremental store (it follows a growing source): run extract with "
                         f"--incremental to append new samples, or use a new --out for a fixed-length store")
    if not store.incremental:
        _check_fixed_store(store, p)
    return upgraded(open_or_create(p.url, config=p.cfg.pinned_like(store.config), n_samples=len(p.src),
                                   sample_shape=p.cfg.latent_shape, shard_size=p.shard_size,
                                   data_prefix={} if p.incremental else None))


def upgraded(store: LatentStore) -> LatentStore:
    """The store in the current format: a store of an earlier format is rewritten once, its pinned
    config in the current form (``pflatents.tasks.config.migrate``). Call under the store lock, after
    the job was checked against the store (a refused job leaves the store untouched)."""
    store.upgrade(ExtractConfig.from_store(store).to_dict())
    return store


def _check_fixed_store(store: LatentStore, p: Prepared) -> None:
    """A fixed-length store and data that are not the ones it was made from: grew, or changed.

    Grown data with an incremental job converts the store (everything else in the config must match)."""
    pinned = store.config.get("data", {})
    n_old, n_new = int(pinned.get("n_samples", store.n_samples)), len(p.src)
    if n_new == n_old and not p.incremental:
        return  # the same length: the config check names any difference
    grew = n_new >= n_old and p.src.fingerprint(n_old) == pinned.get("fingerprint")
    if not grew:
        if n_new == n_old:
            return
        raise InputError(f"the data {p.src.spec} now has {n_new} samples and its first {min(n_new, n_old)} are not "
                         f"those {store.url} was made from ({n_old} samples); use a new --out for this data")
    if not p.incremental:
        raise InputError(f"the data {p.src.spec} grew from {n_old} to {n_new} samples since {store.url} was made "
                         f"(its first {n_old} samples are unchanged)\nrun extract again with --incremental to append "
                         f"the {n_new - n_old} new samples (the store becomes incremental and keeps its latents), "
                         f"or use a new --out")
    new = p.cfg.to_dict()
    same = {**new, "data": {**pinned, **{k: v for k, v in new["data"].items() if k != "incremental"}}}
    same["data"].update(n_samples=n_old, fingerprint=pinned.get("fingerprint"))
    same = ExtractConfig(**same).pinned_like(store.config)  # a store pinned by earlier code, same meaning: matches
    store.check_matches(same, None, p.cfg.latent_shape, p.shard_size)
    store.make_incremental(new, {"n": n_old, "fingerprint": pinned["fingerprint"]})


def check_prefix(store: LatentStore, src: Source) -> int:
    """Refuse a source whose already-planned prefix changed or shrank; returns the prefix length."""
    prefix = store.data_prefix or {}
    n_old = int(prefix.get("n", 0))
    if len(src) < n_old:
        raise InputError(f"the data {src.spec} now has {len(src)} samples, fewer than the {n_old} already planned "
                         f"in {store.url}; refusing to continue (samples must only be appended)")
    if src.fingerprint(n_old) != prefix.get("fingerprint"):
        raise InputError(f"the data {src.spec} changed in its first {n_old} samples (already extracted into "
                         f"{store.url}); refusing to extend the store. Restore the data, or extract into a new store")
    return n_old


def grow_to_source(store: LatentStore, src: Source) -> int:
    """Coordinator step for a growing source: check the prefix, scan new samples, grow the plan; returns #new samples."""
    n_old = check_prefix(store, src)
    n_new = len(src)
    if n_new == n_old:
        return 0
    src.check_finite(start=n_old)
    store.grow(n_new, {"n": n_new, "fingerprint": src.fingerprint(n_new)})
    return n_new - n_old


def check_source(store: LatentStore, cfg: ExtractConfig, src: Source) -> None:
    """For resume: the data must be what the store was planned on."""
    if cfg.data.incremental:
        check_prefix(store, src)
        return
    if src.fingerprint() != cfg.data.fingerprint or len(src) != cfg.data.n_samples:
        raise InputError(f"the data {cfg.data.spec} changed since the store was created (fingerprint or length "
                         f"differs); refusing to resume {store.url}")


@contextlib.contextmanager
def locked(open_store: Callable[[], LatentStore], url: str, owner: dict) -> Iterator[LatentStore]:
    """Take the store's lock, then open (or create) the store: nothing is read for planning before
    the lock is held, so two first runs cannot both create a store, and growth never works from
    metadata read before another run changed it.

    The yielded store is fenced on the lock's token: its record and metadata writes stop with
    ``LeaseLostError`` once the lock is lost. A lease (object stores) is renewed from a thread while
    held; losing it is reported when the block ends (``LeaseLostError``), or as a warning when the
    block already ends with an error. Something that is not a store at ``url`` is refused before any
    lock file is written there; a refused creation leaves no directory behind.
    """
    kind = store_kind(url)
    if kind == "foreign":
        raise NotAStoreError(f"{url} exists and is not a pflatents store; refusing to write into it\n"
                             f"choose a new output path (or an empty directory)")
    new_dir = "://" not in url and not Path(url).exists()
    lock = store_lock(url)
    lock.acquire(owner)
    try:
        store = open_store()
    except BaseException:
        _release_quietly(lock)
        if new_dir:
            _remove_if_only_lock(Path(url))
        raise
    store.fence(lock.token)
    store.ensure_status_array()  # stores made before per-sample status get it, under the lock
    lock.keep_alive()
    try:
        yield store
    except BaseException:
        _release_quietly(lock)
        raise
    lock.release()


def _release_quietly(lock) -> None:
    """Release on an error path: a lost lease becomes a warning, not a second error."""
    try:
        lock.release()
    except StoreLockedError as e:
        warnings.warn(str(e), stacklevel=3)


def _remove_if_only_lock(root: Path) -> None:
    """Remove a directory this run created if it holds nothing but the lock folder."""
    try:
        entries = {p.name for p in root.iterdir()}
    except OSError:
        return
    if entries <= {"lock"}:
        shutil.rmtree(root, ignore_errors=True)


def bitwise_caveats(store: LatentStore, device: str) -> list[str]:
    """Why shards written now may differ in their last bits from the shards already done.

    What bitwise resume promises: a shard's latents are a deterministic function of the pinned
    config (batch size included) on the same device kind with the same torch and numpy; a resume
    under those conditions writes exactly what an uninterrupted run would have (tested by the kill
    tests). Another device kind (CPU vs CUDA kernels) or other library versions keep the latents
    within the solver's tolerance, not bit for bit; this lists such differences for a warning.
    """
    from pflatents.storage.layout import versions
    from pflatents.tasks.models.registry import resolve_device

    lines = []
    pinned, now = store.meta.get("versions") or {}, versions()
    changed = [f"{k} {pinned[k]} -> {now.get(k)}" for k in ("torch", "numpy") if k in pinned and pinned[k] != now.get(k)]
    if changed:
        lines.append(f"library versions differ from those {store.url} was made with ({', '.join(changed)})")
    kinds = sorted({str(r.get("device") or "").split(":")[0] for r in store.shard_records().values()
                    if r.get("state") == "done" and r.get("device")})
    kind = resolve_device(device).type
    if kinds and kinds != [kind]:
        lines.append(f"done shards ran on {', '.join(kinds)}, this run on {kind}")
    if lines:
        lines.append("new shards then agree with the done ones within the solver's tolerance, not bit for bit")
    return lines
