"""Growth of incremental stores (a growing source): extend the plan, publish the new count.

Incremental stores keep two extents in the attrs: ``n_planned``, the length of the arrays and of
the shard plan, and ``n_samples``, the published count: every shard below it is done. The
coordinator (under the store lock) grows the arrays to the new ``n_planned`` before any task
writes, and publishes ``n_samples`` after all shards are done, so a reader that slices
``[:n_samples]`` (``latents_dask``, ``open_xarray``) never sees unwritten rows (growing arrays in
place tore readers; pre-allocated capacity plus a published count did not). ``data_prefix`` holds
the length and fingerprint of the data the plan covers, to refuse data that changed there.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from pflatents.storage.config import config_hash, to_json
from pflatents.storage.errors import StoreError
from pflatents.storage.layout import ATTR, plan_shards
from pflatents.storage.records import pause_for_tests

if TYPE_CHECKING:
    import zarr

__all__ = ["Growth"]


class Growth:
    """Mixin of ``LatentStore``: ``grow``, ``make_incremental`` and ``publish`` (coordinator only)."""

    meta: dict[str, Any]
    _group: zarr.Group
    _latents: zarr.Array
    _nfe: zarr.Array
    _status: zarr.Array | None
    _sample_ids: zarr.Array | None
    _labels: zarr.Array | None
    url: str
    n_samples: int
    n_planned: int
    n_shards: int
    shard_size: int
    sample_shape: tuple[int, ...]
    incremental: bool
    pending_shards: Any
    _check_writable: Any
    _base_record: Any
    _put_record: Any
    _check_fence: Any

    def grow(self, n_new: int, data_prefix: Mapping[str, Any]) -> list[int]:
        """Extend the plan to ``n_new`` samples; returns the shard ids added or re-opened.

        Order matters for crash safety: (1) a partial last shard loses its done record (its chunk
        will hold more samples, its checksum covers fewer), (2) the arrays grow, (3) the attrs
        name the new plan. A crash between steps leaves a store that the next run grows again.
        Readers are unaffected: they read ``[:n_samples]``, published only after the writes.
        """
        self._check_writable()
        if not self.incremental:
            raise StoreError(f"{self.url} is not an incremental store; it cannot grow")
        old, size = self.n_planned, self.shard_size
        if n_new < old:
            raise StoreError(f"cannot shrink {self.url} from {old} to {n_new} samples")
        if n_new == old:
            return []
        self._check_fence()  # the resizes below rewrite array metadata
        first = old // size
        if old % size:  # the old last shard was partial: it is re-done over its full range
            self._put_record(first, {**self._base_record(first), "state": "grown", "error": None,
                                     "checksum": None, "timings": {}, "device": None})
        self._latents.resize((n_new, *self.sample_shape))
        self._nfe.resize((n_new,))
        for array in (self._status, self._sample_ids, self._labels):
            if array is not None:
                array.resize((n_new,))
        pause_for_tests("PFLATENTS_PAUSE_IN_GROW")  # kill tests: arrays grown, plan not yet
        self.meta.update(n_planned=int(n_new), n_shards=len(plan_shards(int(n_new), size)),
                         data_prefix=to_json(dict(data_prefix), "data_prefix"))
        self._put_meta()
        return list(range(first, self.n_shards))

    def make_incremental(self, config: Mapping[str, Any], data_prefix: Mapping[str, Any]) -> None:
        """Turn a fixed-length store into an incremental one (under the store lock; one attrs write).

        ``config`` is the new pinned config (the caller checked that it differs only in how the
        data are identified), ``data_prefix`` the {"n", "fingerprint"} of the data extracted so far.
        """
        self._check_writable()
        if self.incremental:
            return
        self.meta.update(incremental=True, n_planned=self.n_samples, config=to_json(config),
                         config_hash=config_hash(config),
                         data_prefix=to_json(dict(data_prefix), "data_prefix"))
        self._put_meta()

    def publish(self) -> bool:
        """Publish ``n_samples = n_planned`` if every shard is done; True if it is published."""
        if self.n_samples == self.n_planned:
            return True
        if self.pending_shards():
            return False
        self._check_writable()
        self.meta["n_samples"] = self.n_planned
        self._put_meta()
        return True

    def _put_meta(self) -> None:
        """Rewrite the ``pflatents`` attrs (the coordinator's, under the store lock)."""
        self._check_fence()
        self._group.attrs.update({ATTR: to_json(self.meta, "meta")})
