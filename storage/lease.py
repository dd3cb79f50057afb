"""Leases on fsspec stores: the store lock where coordinators on different machines meet.

A lease object ``<store>/lock/owner.json`` is taken by an atomic create-if-absent (on S3 a PUT with
``If-None-Match: *``), renewed from a daemon thread every ``lease_s / 5`` with a PUT conditional on
the ETag written last (``If-Match``), and deleted on release under the same condition. A holder
whose lease ran out (``$PFLATENTS_LOCK_LEASE_S``, default 600 s after its last renewal) is taken
over by a conditional PUT, so of two racing coordinators exactly one wins. A holder in our own
process table (same kernel boot id and PID namespace) that is dead is taken over at once. On fsspec
filesystems without conditional writes the same steps run unconditionally: best effort.

``lease_until`` is the holder's wall clock: the machines' clocks must agree to well within the lease
(NTP does; the default lease is 600 s). The conditional writes keep the lock exclusive whatever the
clocks say; a clock far ahead only takes a live holder's lease early, which its next renewal or
fenced write then reports as lost.
"""

from __future__ import annotations

import json
import os
import threading
import time
from typing import Any

from pflatents.storage.errors import LeaseLostError, StoreError, StoreLockedError
from pflatents.storage.lock import LOCK_KEY, StoreLock, parse_record, pid_alive, process_space

__all__ = ["LeaseLock", "LEASE_ENV"]

LEASE_ENV = "PFLATENTS_LOCK_LEASE_S"


def _default_lease() -> float:
    """Lease of fsspec locks in seconds (``$PFLATENTS_LOCK_LEASE_S``, default 600)."""
    try:
        return max(1.0, float(os.environ.get(LEASE_ENV) or 600.0))
    except ValueError:
        return 600.0


class LeaseLock(StoreLock):
    """A renewed lease object on an fsspec filesystem (conditional writes on S3)."""

    def __init__(self, fs: Any, root: str, url: str = "", lease_s: float | None = None) -> None:
        self.fs, self.remote_path = fs, f"{root.rstrip('/')}/{LOCK_KEY}"
        self.path = f"{url.rstrip('/')}/{LOCK_KEY}" if url else self.remote_path
        self.lease_s = float(lease_s) if lease_s is not None else _default_lease()
        self.s3 = hasattr(fs, "call_s3") and "s3" in (fs.protocol if isinstance(fs.protocol, tuple)
                                                      else (fs.protocol,))
        self._etag: str | None = None
        self._record_now: dict[str, Any] | None = None
        self._stop: threading.Event | None = None
        self._mutex = threading.Lock()  # a renewal never rewrites a lease that release removed
        self.lost: str | None = None

    # ---- protocol ------------------------------------------------------------------------

    def acquire(self, owner: dict[str, Any] | None = None) -> dict[str, Any]:
        if self.token is not None:
            raise StoreLockedError(self.message(self._record_now))
        record = self._record(owner)
        for _ in range(10):
            record["lease_until"] = time.time() + self.lease_s
            try:
                etag = self._put(record, etag=None)
                if etag is not False:
                    return self._won(record, etag)
                etag, current = self._read()
                if current is None and etag is None:
                    continue  # released in between: try to create it again
                if current is not None and not self._stale(current):
                    raise StoreLockedError(self.message(current))
                if not self.s3:  # no conditional replace: remove the stale lease, create ours
                    self._delete(None)
                elif etag is not None and self._put(record, etag=etag) is not False:
                    return self._won(record, self._last_put_etag)
            except OSError as e:
                raise StoreError(f"cannot write the store lock {self.path}: {e}") from None
        raise StoreLockedError(f"could not take the store lock {self.path}: other processes race for it")

    def keep_alive(self) -> None:
        """Renew the lease every ``lease_s / 5`` from a daemon thread until ``release``."""
        if self.token is None or self._stop is not None:
            return
        stop = self._stop = threading.Event()
        threading.Thread(target=self._renew_loop, args=(stop,), name="pflatents-lock-lease",
                         daemon=True).start()

    def refresh(self) -> None:
        """Extend the lease once; ``LeaseLostError`` if it is no longer ours."""
        if self.token is None or self._record_now is None:
            raise LeaseLostError(f"store lock {self.path} is not held by this process")
        record = {**self._record_now, "lease_until": time.time() + self.lease_s}
        etag = self._put(record, etag=self._etag if self.s3 else None, replace=True)
        if etag is False:
            raise LeaseLostError(f"the lease {self.path} was taken over by another process")
        self._etag, self._record_now = etag, record

    def release(self) -> None:
        with self._mutex:
            if self._stop is not None:
                self._stop.set()
                self._stop = None
            token, lost = self.token, self.lost
            self.token, self.lost, self._record_now = None, None, None
            if token is None:
                return
            etag, current = self._read()
            if current is None or current.get("token") != token:
                who = "nobody" if current is None else f"pid {current.get('pid')} on {current.get('host')}"
                raise LeaseLostError(f"the store lock {self.path} was lost during the run (now held by {who})"
                                     f"{f': {lost}' if lost else ''}; run `pflatents verify` and `resume` on the store")
            self._delete(etag)
            if lost:
                raise LeaseLostError(f"the lease {self.path} was at risk during the run: {lost}")

    def holder(self) -> dict[str, Any] | None:
        _, current = self._read()
        if current is None or time.time() > float(current.get("lease_until", 0)):
            return None
        return current

    def check(self, token: str | None = None) -> None:
        if self.lost and (token is None or token == self.token):
            raise LeaseLostError(f"the store lock {self.path} was lost: {self.lost}")
        super().check(token)

    def _hint(self) -> str:
        return (f", or for its lease to run out ({self.lease_s:g} s after its last renewal) if that "
                f"process is gone (to take over sooner, remove {self.path} once you are sure it is)")

    # ---- helpers -------------------------------------------------------------------------

    def _won(self, record: dict[str, Any], etag: str | None) -> dict[str, Any]:
        self._etag, self._record_now, self.token, self.lost = etag, record, record["token"], None
        return record

    def _stale(self, holder: dict[str, Any]) -> bool:
        """Lease ran out, or the holder is dead in our own process table."""
        if time.time() > float(holder.get("lease_until", 0)):
            return True
        space = holder.get("process_space")
        if space is not None and space == process_space():
            return not pid_alive(int(holder.get("pid", -1)), holder.get("pid_start"))
        return False

    def _renew_loop(self, stop: threading.Event) -> None:
        last_ok = time.time()
        while not stop.wait(self.lease_s / 5):
            with self._mutex:
                if stop.is_set():
                    return
                try:
                    self.refresh()
                    last_ok = time.time()
                except LeaseLostError as e:
                    self.lost = str(e)
                    return
                except OSError as e:  # unreachable for now: the lease still runs until its end
                    if time.time() > last_ok + self.lease_s:
                        self.lost = f"renewal failed for longer than the lease ({e})"
                        return

    def _read(self) -> tuple[str | None, dict[str, Any] | None]:
        """(ETag, record) of the lease object; (None, None) if absent. ETag is read first, so a
        conditional write with it fails if the object changed after the read."""
        etag = None
        try:
            if self.s3:
                self.fs.invalidate_cache(self.remote_path)
                etag = self.fs.info(self.remote_path).get("ETag")
            text = self.fs.cat_file(self.remote_path)
        except FileNotFoundError:
            return None, None
        return etag, parse_record(text.decode() if isinstance(text, bytes) else text)

    _last_put_etag: str | None = None

    def _put(self, record: dict[str, Any], etag: str | None, replace: bool = False) -> str | None | bool:
        """Write the record if absent (``etag`` None, not ``replace``) or unchanged since ``etag``
        was read; the new ETag (None off S3), or False if the condition failed."""
        data = json.dumps(record).encode()
        if self.s3:
            bucket, key, _ = self.fs.split_path(self.remote_path)
            cond = {"IfMatch": etag} if etag else ({} if replace else {"IfNoneMatch": "*"})
            try:
                out = self.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, **cond)
            except FileExistsError:
                return False
            except OSError as e:
                if "Precondition" in str(e) or "412" in str(e) or getattr(e, "errno", None) == 22:
                    return False
                raise
            self.fs.invalidate_cache(self.remote_path)
            self._last_put_etag = out.get("ETag")
            return self._last_put_etag
        if etag is None and not replace:
            try:
                with self.fs.open(self.remote_path, "xb") as f:
                    f.write(data)
                return None
            except FileExistsError:
                return False
            except (ValueError, NotImplementedError):  # no exclusive create here: best effort
                if self.fs.exists(self.remote_path):
                    return False
        elif replace:
            _, current = self._read()
            if current is None or current.get("token") != record["token"]:
                return False
        self.fs.pipe_file(self.remote_path, data)
        return None

    def _delete(self, etag: str | None) -> None:
        try:
            if self.s3 and etag:
                bucket, key, _ = self.fs.split_path(self.remote_path)
                self.fs.call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=etag)
                self.fs.invalidate_cache(self.remote_path)
            else:
                self.fs.rm_file(self.remote_path)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise LeaseLostError(f"the store lock {self.path} changed just before release ({e}); "
                                 f"another process holds it now") from None
