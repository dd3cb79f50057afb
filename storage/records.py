"""Shard records and shard writes: the part of the store that tasks touch.

Each shard owns whole storage objects (its latents chunk, its nfe chunk, its record), so shards are
written concurrently by many processes without locks on data. No sharding codec: two writers of
inner chunks of one Zarr shard lost data (zarr-python#3682). A record is the ``zarr.json`` of the
child group ``shards/<id:06d>``, replaced in one atomic write: "writing" before the data, "done"
(with its checksum) only after the data were read back bit for bit, "failed" or "corrupt" when not.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from pflatents.storage.checksums import bad_rows, checksum, first_indices
from pflatents.storage.config import to_json
from pflatents.storage.errors import ShardVerifyError, StoreError
from pflatents.storage.layout import SAMPLE_STATUS, now

if TYPE_CHECKING:
    import zarr

    from pflatents.storage.location import Location

__all__ = ["ShardRecords", "record_key", "record_of", "pause_for_tests", "PAUSE_ENV"]

PAUSE_ENV = "PFLATENTS_PAUSE_IN_WRITE"  # test hook: seconds to sleep after the latents write


class ShardRecords:
    """Mixin of ``LatentStore``: write, read and list the per-shard records."""

    _loc: Location
    _latents: zarr.Array
    _nfe: zarr.Array
    _status: zarr.Array | None
    _sample_ids: zarr.Array | None
    _labels: zarr.Array | None
    read_only: bool
    url: str
    sample_shape: tuple[int, ...]
    n_shards: int
    n_planned: int
    shard_range: Any
    _check_fence: Any

    def write_shard(self, shard_id: int, latents: np.ndarray, nfe: np.ndarray,
                    info: Mapping[str, Any] | None = None, status: np.ndarray | None = None,
                    ids: np.ndarray | None = None, labels: np.ndarray | None = None) -> dict[str, Any]:
        """Write, read back and verify one shard, then record it done; returns the record.

        ``status`` (per sample: 0 ok, 1 step_limit, 2 nonfinite; default all ok) flags samples the
        solver could not finish: their latents are stored as NaN, the shard is still done, and its
        record counts them (``samples_failed``, ``sample_status``).

        ``ids`` (strings) and ``labels`` (int64) are the samples' ids and class labels, required by
        a store that keeps them (``sample_id`` / ``label`` arrays): written, read back and
        checksummed with the latents, so a done shard's ids are exactly its samples'.

        Raises:
            StoreError: wrong shape or dtype for this shard, or the store is read-only.
            ShardVerifyError: non-finite latents of a sample not flagged (nothing written) or a
                read-back mismatch.
        """
        self._check_writable()
        i0, i1 = self.shard_range(shard_id)
        x = self._as_latents(shard_id, latents, i1 - i0)
        n = self._as_nfe(shard_id, nfe, i1 - i0)
        st = self._as_status(shard_id, status, i1 - i0)
        sid, lab = self._as_ids_labels(shard_id, ids, labels, i1 - i0)
        flagged = st != 0
        if flagged.any():
            x = x.copy()
            x[flagged] = np.nan
        bad = bad_rows(x)
        bad = bad[~flagged[bad]]
        if bad.size:
            raise ShardVerifyError(f"shard {shard_id} (samples {i0}..{i1 - 1}) has NaN/Inf "
                                   f"latents at samples {first_indices(bad + i0)}; not written")
        self._put_record(shard_id, {**self._base_record(shard_id), "state": "writing",
                                    "finished": None, "started": now()})
        t0 = time.perf_counter()
        # write_empty_chunks: skip zarr's "is this chunk all fill value?" scan of every chunk
        # (several passes over it); every chunk of a written shard is stored
        self._latents.with_config({"write_empty_chunks": True})[i0:i1] = x
        pause_for_tests()
        self._nfe.with_config({"write_empty_chunks": True})[i0:i1] = n
        if self._status is not None:
            self._status.with_config({"write_empty_chunks": True})[i0:i1] = st
        if self._sample_ids is not None:
            self._sample_ids.with_config({"write_empty_chunks": True})[i0:i1] = sid
        if self._labels is not None:
            self._labels.with_config({"write_empty_chunks": True})[i0:i1] = lab
        t1 = time.perf_counter()
        problem, digest = self._read_back(i0, i1, x, n, st, sid, lab)
        if problem:
            raise ShardVerifyError(f"shard {shard_id} (samples {i0}..{i1 - 1}) failed "
                                   f"read-back verification: {problem}; not marked done")
        timings = {"write_s": t1 - t0, "verify_s": time.perf_counter() - t1}
        record = self._record(shard_id, "done", None, digest, info, timings)
        if flagged.any():
            codes = np.bincount(st[flagged].astype(np.int64), minlength=len(SAMPLE_STATUS))
            record["samples_failed"] = int(flagged.sum())
            record["sample_status"] = {SAMPLE_STATUS[c]: int(k) for c, k in enumerate(codes) if c and k}
            record["failed_samples"] = first_indices(np.flatnonzero(flagged) + i0, 20)
        self._put_record(shard_id, record)
        return record

    def read_shard(self, shard_id: int) -> tuple[np.ndarray, np.ndarray]:
        """A shard's stored latents (float32; NaN where flagged or unwritten) and NFE (int32), as copies."""
        i0, i1 = self.shard_range(shard_id)
        return (np.array(self._latents[i0:i1], dtype=np.float32, copy=True),
                np.array(self._nfe[i0:i1], dtype=np.int32, copy=True))

    def read_ids_labels(self, start: int = 0, stop: int | None = None
                        ) -> tuple[np.ndarray | None, np.ndarray | None]:
        """Stored sample ids (str) and labels (int64) of samples ``[start, stop)``; None for an array
        the store does not keep (stores made before them; labels of a source without any)."""
        stop = self.n_planned if stop is None else int(stop)
        ids = None
        if self._sample_ids is not None:  # zarr hands back numpy's StringDType: plain fixed-width str here
            ids = np.array([str(s) for s in np.asarray(self._sample_ids[int(start):stop]).tolist()], dtype=str)
        labels = None if self._labels is None else np.asarray(self._labels[int(start):stop], dtype=np.int64)
        return ids, labels

    def labels_at(self, index: np.ndarray) -> np.ndarray | None:
        """Stored class labels (int64, -1 unknown) of rows ``index`` (any order), aligned with it; None when
        the store keeps no ``label`` array."""
        if self._labels is None:
            return None
        return np.asarray(self._labels.oindex[np.asarray(index, dtype=np.int64)], dtype=np.int64)

    def sample_status(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Per-sample status codes (int8: 0 ok, 1 step_limit, 2 nonfinite) of samples ``[start, stop)``."""
        stop = self.n_planned if stop is None else int(stop)
        if self._status is None:
            return np.zeros(max(0, stop - int(start)), dtype=np.int8)
        return np.asarray(self._status[int(start):stop], dtype=np.int8)

    def failed_mask(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """True for samples in ``[start, stop)`` whose latents are NaN because the solver could not
        finish them (flagged step_limit or nonfinite): the rows an analysis must leave out."""
        return self.sample_status(start, stop) != 0

    def shards_with_failed_samples(self, records: Mapping[int, Mapping[str, Any]] | None = None) -> list[int]:
        """Ids of done shards that hold flagged samples (``resume --retry-samples`` re-integrates them)."""
        records = self.shard_records() if records is None else records
        return [i for i, r in sorted(records.items())
                if r.get("state") == "done" and int(r.get("samples_failed") or 0) > 0 and i < self.n_shards]

    def mark_failed(self, shard_id: int, error: str, info: Mapping[str, Any] | None = None
                    ) -> dict[str, Any]:
        """Record shard ``shard_id`` as failed with ``error`` (its data is left as it is)."""
        self._check_writable()
        record = self._record(shard_id, "failed", str(error)[:4000], None, info, {})
        self._put_record(shard_id, record)
        return record

    def shard_record(self, shard_id: int) -> dict[str, Any] | None:
        """The record of one shard, or None if it has none yet (pending)."""
        self.shard_range(shard_id)
        return record_of(self._loc.read_json(record_key(int(shard_id))))

    def shard_records(self) -> dict[int, dict[str, Any]]:
        """All shard records by shard id (shards without a record are pending)."""
        ids = sorted(int(n) for n in self._loc.list_dir("shards") if n.isdigit())
        found = self._loc.read_json_many([record_key(i) for i in ids])
        records = {i: record_of(found.get(record_key(i))) for i in ids}
        return {i: r for i, r in records.items() if r is not None}

    def pending_shards(self) -> list[int]:
        """Ids of shards not done (never started, in progress, crashed or failed)."""
        records = self.shard_records()
        return [i for i in range(self.n_shards) if records.get(i, {}).get("state") != "done"]

    def status(self) -> dict[str, Any]:
        """Counts of done / failed / pending shards (they sum to ``n_shards``) and the config."""
        records = self.shard_records()
        states = [records.get(i, {}).get("state") for i in range(self.n_shards)]
        failed = [{"id": i, "error": records[i].get("error")}
                  for i, s in enumerate(states) if s in ("failed", "corrupt")]
        done = states.count("done")
        flagged = self.shards_with_failed_samples(records)
        samples_failed = sum(int(records[i]["samples_failed"]) for i in flagged)
        return {"url": self.url, "n_shards": self.n_shards, "done": done, "failed": len(failed),
                "samples_failed": samples_failed, "shards_with_failed_samples": flagged,
                "pending": self.n_shards - done - len(failed), "n_samples": self.n_samples,
                "n_planned": self.n_planned, "incremental": self.incremental,
                "sample_shape": list(self.sample_shape), "shard_size": self.shard_size,
                "failed_shards": failed, "config_hash": self.config_hash, "config": self.config,
                "created": self.meta.get("created"), "lock": self._lock.holder()}

    def _check_writable(self) -> None:
        """Refuse writes through a read-only handle."""
        if self.read_only:
            raise StoreError(f"store {self.url} was opened read-only (mode='r')")

    def _base_record(self, shard_id: int) -> dict[str, Any]:
        """Fields every record carries: sample range, host, pid, finish time."""
        i0, i1 = self.shard_range(shard_id)
        return {"start": i0, "stop": i1, "host": socket.gethostname(), "pid": os.getpid(),
                "finished": now()}

    def _record(self, shard_id: int, state: str, error: str | None, digest: str | None,
                info: Mapping[str, Any] | None, timings: dict[str, float]) -> dict[str, Any]:
        """A final shard record: the caller's ``info`` (device, timings, ...) plus our fields."""
        extra = to_json(dict(info or {}), "info")
        timings = {**(extra.get("timings") or {}), **timings}
        return {"device": None, **extra, **self._base_record(shard_id), "state": state,
                "error": error, "checksum": digest, "timings": to_json(timings, "timings")}

    def _put_record(self, shard_id: int, record: dict[str, Any]) -> None:
        """Replace the record of one shard: its own group ``zarr.json``, written atomically."""
        self._check_fence()
        node = {"zarr_format": 3, "node_type": "group", "attributes": record}
        self._loc.write_json(record_key(int(shard_id)), node)

    def _as_latents(self, shard_id: int, latents: Any, n: int) -> np.ndarray:
        """Validate a shard's latents and return them as contiguous float32."""
        x = np.asarray(latents)
        expected = (n, *self.sample_shape)
        if x.shape != expected:
            raise StoreError(f"shard {shard_id}: latents have shape {x.shape}, expected {expected}")
        if x.dtype.kind != "f":
            raise StoreError(f"shard {shard_id}: latents have dtype {x.dtype}; floats required")
        with np.errstate(over="ignore"):
            return np.ascontiguousarray(x, dtype=np.float32)

    def _as_nfe(self, shard_id: int, nfe: Any, n: int) -> np.ndarray:
        """Validate a shard's NFE counts and return them as int32."""
        v = np.asarray(nfe)
        if v.shape != (n,):
            raise StoreError(f"shard {shard_id}: nfe has shape {v.shape}, expected {(n,)}")
        if v.dtype.kind not in "iu":
            raise StoreError(f"shard {shard_id}: nfe has dtype {v.dtype}; integers required")
        if n and (v.min() < 0 or v.max() > np.iinfo(np.int32).max):
            raise StoreError(f"shard {shard_id}: nfe values must lie in 0..2**31-1, "
                             f"got {v.min()}..{v.max()}")
        return np.ascontiguousarray(v, dtype=np.int32)

    def _as_status(self, shard_id: int, status: Any, n: int) -> np.ndarray:
        """Validate a shard's per-sample status codes and return them as int8 (None: all ok)."""
        if status is None:
            return np.zeros(n, dtype=np.int8)
        v = np.asarray(status)
        if v.shape != (n,) or v.dtype.kind not in "iu":
            raise StoreError(f"shard {shard_id}: status must be {n} integers, got {v.dtype} {v.shape}")
        if n and (v.min() < 0 or v.max() >= len(SAMPLE_STATUS)):
            raise StoreError(f"shard {shard_id}: status codes must lie in 0..{len(SAMPLE_STATUS) - 1} "
                             f"({', '.join(SAMPLE_STATUS)}), got {v.min()}..{v.max()}")
        if v.any() and self._status is None:
            raise StoreError(f"shard {shard_id}: {self.url} has no per-sample status array (made by an "
                             f"older pflatents); run extract or resume on it once to add it")
        return np.ascontiguousarray(v, dtype=np.int8)

    def _as_ids_labels(self, shard_id: int, ids: Any, labels: Any, n: int
                       ) -> tuple[np.ndarray | None, np.ndarray | None]:
        """Validate a shard's ids and labels against the arrays the store keeps."""
        out: list[np.ndarray | None] = []
        for name, value, array, kinds in (("ids", ids, self._sample_ids, "UTO"), ("labels", labels, self._labels, "iu")):
            if array is None:
                out.append(None)
                continue
            if value is None:
                raise StoreError(f"shard {shard_id}: {self.url} keeps sample {name}; none were given")
            v = np.asarray(value)
            if v.shape != (n,) or v.dtype.kind not in kinds:
                raise StoreError(f"shard {shard_id}: {name} must be {n} {'strings' if name == 'ids' else 'integers'}, "
                                 f"got {v.dtype} {v.shape}")
            out.append(np.array([str(s) for s in v.tolist()], dtype=str) if name == "ids"
                       else np.ascontiguousarray(v, dtype=np.int64))
        return out[0], out[1]

    def _read_chunk(self, i0: int, i1: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | str:
        """Samples ``[i0, i1)`` (latents, nfe, status) as stored, or why they cannot be read."""
        try:
            return (np.asarray(self._latents[i0:i1]), np.asarray(self._nfe[i0:i1]),
                    self.sample_status(i0, i1))
        except Exception as exc:  # a corrupt chunk fails to decode in codec-specific ways
            return f"cannot read the chunk back ({type(exc).__name__}: {exc})"

    def _read_id_chunk(self, i0: int, i1: int) -> tuple[np.ndarray | None, np.ndarray | None] | str:
        """Sample ids and labels ``[i0, i1)`` as stored (None where not kept), or why they cannot be read."""
        try:
            return self.read_ids_labels(i0, i1)
        except Exception as exc:  # noqa: BLE001 - as _read_chunk
            return f"cannot read the sample ids back ({type(exc).__name__}: {exc})"

    def _read_back(self, i0: int, i1: int, x: np.ndarray, n: np.ndarray, st: np.ndarray,
                   ids: np.ndarray | None = None, labels: np.ndarray | None = None
                   ) -> tuple[str | None, str | None]:
        """Re-read what ``write_shard`` just wrote: (problem or None, checksum of the stored data).

        The stored data must equal ``x`` / ``n`` / ``st`` bit for bit (the stored latents are
        then finite where not flagged: ``x`` was checked before the write); the checksum is
        computed from the data read back, once.
        """
        got = self._read_chunk(i0, i1)
        if isinstance(got, str):
            return got, None
        y, m = np.asarray(got[0], dtype=np.float32), np.asarray(got[1], dtype=np.int32)
        if y.shape != x.shape or m.shape != n.shape:
            return f"read back shapes {y.shape}, {m.shape}, wrote {x.shape}, {n.shape}", None
        bits, want = y.view(np.uint32), x.view(np.uint32)  # bitwise: -0.0 != 0.0, NaN == NaN
        if not np.array_equal(bits, want):
            rows = np.flatnonzero((bits != want).reshape(len(y), -1).any(axis=1))
            return f"latents read back differ from those written at samples {first_indices(rows + i0)}", None
        if not np.array_equal(m, n):
            rows = np.flatnonzero(m != n)
            return f"nfe read back differ from those written at samples {first_indices(rows + i0)}", None
        if not np.array_equal(got[2], st):
            return "status read back differs from the status written", None
        kept = self._read_id_chunk(i0, i1)
        if isinstance(kept, str):
            return kept, None
        for name, back, want_v in (("sample ids", kept[0], ids), ("labels", kept[1], labels)):
            if (back is None) != (want_v is None) or (back is not None and not np.array_equal(back, want_v)):
                return f"{name} read back differ from those written", None
        return None, checksum(y, m, status=st, ids=kept[0], labels=kept[1])


def pause_for_tests(var: str = PAUSE_ENV) -> None:
    """Sleep ``$<var>`` seconds: kill tests aim at a half-written shard (``PFLATENTS_PAUSE_IN_WRITE``)
    or a half-done growth step (``PFLATENTS_PAUSE_IN_GROW``)."""
    seconds = float(os.environ.get(var) or 0)
    if seconds > 0:
        time.sleep(seconds)


def record_key(shard_id: int) -> str:
    """Key of a shard record: the ``zarr.json`` of child group ``shards/<id:06d>``."""
    return f"shards/{shard_id:06d}/zarr.json"


def record_of(node: dict[str, Any] | None) -> dict[str, Any] | None:
    """The record held in a shard group's metadata, or None if it holds none."""
    attrs = (node or {}).get("attributes")
    return dict(attrs) if isinstance(attrs, dict) and attrs else None
