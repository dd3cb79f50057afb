"""Verification of done shards: re-read each one, check finiteness and its recorded checksum."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pflatents.storage.checksums import bad_rows, checksum, first_indices

__all__ = ["ShardVerify"]


class ShardVerify:
    """Mixin of ``LatentStore``: ``verify`` and friends (uses the record methods of ``ShardRecords``)."""

    n_shards: int
    shard_range: Any
    shard_record: Any
    shard_records: Any
    _check_writable: Any
    _base_record: Any
    _put_record: Any
    _read_chunk: Any
    _read_id_chunk: Any

    def verify_shard(self, shard_id: int) -> bool:
        """Re-read a done shard: True if it is finite and matches the recorded checksum."""
        record = self.shard_record(shard_id)
        if record is None or record.get("state") != "done":
            return False
        return self.shard_problem(shard_id, record) is None

    def shard_problem(self, shard_id: int, record: Mapping[str, Any]) -> str | None:
        """What is wrong with a done shard's stored data (None if it matches its record)."""
        i0, i1 = self.shard_range(shard_id)
        if (record.get("start"), record.get("stop")) != (i0, i1):
            return (f"record covers samples {record.get('start')}..{record.get('stop')}, "
                    f"the shard is {i0}..{i1}")
        return self._check_chunk(i0, i1, str(record.get("checksum")))

    def verify(self, mark: bool = True, workers: int = 8) -> dict[str, Any]:
        """Re-read every done shard (checksum, finiteness); mark bad ones "corrupt" if ``mark``.

        A corrupt shard is not done, so ``pending_shards`` (and ``resume``) re-queue it.
        Returns {"checked", "ok", "corrupt": [{"id", "error"}], "not_done"}.
        """
        from concurrent.futures import ThreadPoolExecutor

        if mark:
            self._check_writable()
        records = self.shard_records()
        done = [i for i in range(self.n_shards) if records.get(i, {}).get("state") == "done"]
        with ThreadPoolExecutor(max(1, workers)) as pool:
            problems = list(pool.map(lambda i: self.shard_problem(i, records[i]), done))
        corrupt = [{"id": i, "error": p} for i, p in zip(done, problems) if p is not None]
        for bad in corrupt if mark else []:
            self.mark_corrupt(bad["id"], bad["error"])
        return {"checked": len(done), "ok": len(done) - len(corrupt), "corrupt": corrupt,
                "not_done": self.n_shards - len(done)}

    def mark_corrupt(self, shard_id: int, error: str) -> dict[str, Any]:
        """Record a done shard whose data no longer verifies as "corrupt" (re-queued on resume)."""
        self._check_writable()
        record = {**self._base_record(shard_id), "state": "corrupt", "device": None,
                  "error": f"verify: {error}"[:4000], "checksum": None, "timings": {}}
        self._put_record(shard_id, record)
        return record

    def _check_chunk(self, i0: int, i1: int, expected: str) -> str | None:
        """Re-read samples ``[i0, i1)``; return what is wrong with them, or None if all is well.

        Latents must be finite except for samples flagged in the status array.

        ``expected`` is a record's checksum; its prefix names the algorithm (crc32c, blake2b).
        """
        algorithm = expected.split(":", 1)[0] if ":" in expected else ""
        if algorithm not in ("crc32c", "blake2b"):
            return f"the record holds no known checksum ({expected!r})"
        got = self._read_chunk(i0, i1)
        if isinstance(got, str):
            return got
        x, n, st = got
        kept = self._read_id_chunk(i0, i1)
        if isinstance(kept, str):
            return kept
        ids, labels = kept
        bad = bad_rows(x)
        bad = bad[st[bad] == 0]  # flagged samples hold NaN by design
        if bad.size:
            return f"NaN/Inf at samples {first_indices(bad + i0)}"
        digest = checksum(x, n, algorithm, status=st, ids=ids, labels=labels)
        return None if digest == expected else f"checksum {digest} != recorded {expected}"
