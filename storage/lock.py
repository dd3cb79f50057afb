"""The store lock: at most one coordinator (extract, resume, scheduled run, verify) per store.

Local paths (``FileLock``): ``fcntl.flock`` on ``<store>/lock/owner.json``. The kernel releases the
lock when its holder dies, however it dies, so a run right after a SIGKILL takes it at once and
there is no stale lock to judge. The file is never deleted (a deleted and re-created lock file
would let two processes each lock their own); it holds the holder's record while held and is
emptied on release. On NFS, flock is carried by the server's lock manager (NFSv4); a shared
filesystem without working locks needs an fsspec URL instead.

fsspec URLs (``LeaseLock``, in ``pflatents.storage.lease``): a lease object ``<store>/lock/owner.json`` taken by an atomic
create-if-absent (on S3 a conditional PUT with ``If-None-Match: *``), renewed by a background thread
every ``lease_s / 5`` with a PUT conditional on the ETag it wrote last (``If-Match``), and deleted on
release under the same condition. A holder whose lease ran out is taken over, also by a conditional
PUT, so two racing coordinators cannot both win. A holder in this kernel and PID namespace (same
``boot_id`` and ``/proc/self/ns/pid``, so the same process table) that is dead is taken over at
once; host name and pid alone are not an identity (containers share host names). Other fsspec
filesystems (no conditional writes) get the same protocol without the conditions: best effort.

Fencing: every record and metadata write of a store handle that was given a token
(``LatentStore.fence``) first checks that the lock still holds that token (``check``), so a
coordinator that lost its lease, or a task of a run whose coordinator is gone, stops instead of
writing over the new holder's work. A lost lease (a failed renewal past the lease's end, or a
token mismatch at release) raises ``LeaseLostError`` naming what happened.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
import uuid
from abc import ABC, abstractmethod
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pflatents.storage.config import to_json
from pflatents.storage.errors import LeaseLostError, StoreError, StoreLockedError

__all__ = ["StoreLock", "FileLock", "lock_for", "pid_alive", "process_space", "parse_record", "LOCK_KEY"]

LOCK_KEY = "lock/owner.json"
GRACE_S = 0.5  # a holder() probe holds the lock shared for microseconds: acquirers retry this long


def _now() -> str:
    """Current UTC time as ISO 8601 text."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _proc_stat(pid: int) -> list[str] | None:
    """Fields of ``/proc/<pid>/stat`` after the command name, or None where unavailable."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()


def process_start(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot (Linux), to tell a reused pid apart."""
    fields = _proc_stat(pid)
    return int(fields[19]) if fields and len(fields) > 19 else None


def pid_alive(pid: int, start: int | None = None) -> bool:
    """True if process ``pid`` runs in this PID namespace (not a zombie, and started at ``start``)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    fields = _proc_stat(pid)
    if fields is not None and fields[0] == "Z":
        return False
    return start is None or fields is None or process_start(pid) == start


def process_space() -> str | None:
    """Kernel boot id + PID namespace: two processes with the same value see the same pids."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{boot}/{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return None


def parse_record(text: str | None) -> dict[str, Any] | None:
    """Parse a lock record; None if the text is not a complete record."""
    try:
        record = json.loads(text) if text else None
    except ValueError:
        return None
    return record if isinstance(record, dict) and "token" in record else None


class StoreLock(ABC):
    """Exclusive lock of one store; ``acquire`` / ``release``, or use it as a context manager."""

    path: str
    token: str | None = None

    def _record(self, owner: dict[str, Any] | None) -> dict[str, Any]:
        """The holder record written into the lock object."""
        pid = os.getpid()
        return {"host": socket.gethostname(), "pid": pid, "pid_start": process_start(pid),
                "process_space": process_space(), "token": uuid.uuid4().hex, "acquired": _now(),
                "owner": to_json(owner or {}, "owner")}

    @abstractmethod
    def acquire(self, owner: dict[str, Any] | None = None) -> dict[str, Any]:
        """Take the lock or raise ``StoreLockedError`` naming the live holder."""

    @abstractmethod
    def release(self) -> None:
        """Release the lock if held; ``LeaseLostError`` if it was lost while held."""

    @abstractmethod
    def holder(self) -> dict[str, Any] | None:
        """The live holder's record, or None when nobody holds the lock."""

    def keep_alive(self) -> None:
        """Renew the lock while held (leases only; a no-op for kernel locks)."""

    def check(self, token: str | None = None) -> None:
        """Raise ``LeaseLostError`` unless the lock is held under ``token`` (default: ours)."""
        token = token or self.token
        holder = self.holder()
        if token is None or holder is None or holder.get("token") != token:
            who = "nobody" if holder is None else f"pid {holder.get('pid')} on {holder.get('host')}"
            raise LeaseLostError(f"the store lock {self.path} is no longer held by this run (now held "
                                 f"by {who}); stopping before writing. Check the store with "
                                 f"`pflatents status`, then `pflatents resume` it")

    def message(self, holder: dict[str, Any] | None) -> str:
        """Two lines: who holds the lock, and what to do."""
        holder = holder or {}
        return (f"store is locked by pid {holder.get('pid')} on host {holder.get('host')} since "
                f"{holder.get('acquired')} (another extract/resume is running)\n"
                f"wait for it to finish{self._hint()}")

    def _hint(self) -> str:
        return ""

    def __enter__(self) -> StoreLock:
        if self.token is None:
            self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class FileLock(StoreLock):
    """``fcntl.flock`` on the lock file of a store on a local (or NFSv4) filesystem."""

    def __init__(self, store_root: Path) -> None:
        self.local_path = Path(store_root) / LOCK_KEY
        self.path = str(self.local_path)
        self._fd: int | None = None

    def acquire(self, owner: dict[str, Any] | None = None) -> dict[str, Any]:
        if self._fd is not None:
            raise StoreLockedError(self.message(self.holder()))
        deadline = time.monotonic() + GRACE_S
        while True:
            fd = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                if time.monotonic() > deadline:
                    raise StoreLockedError(self.message(self.holder())) from None
                time.sleep(0.02)
                continue
            if self._same_file(fd):
                break
            os.close(fd)  # the file was replaced under us (by hand): lock the one now there
        record = self._record(owner)
        data = json.dumps(record).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        os.fsync(fd)
        self._fd, self.token = fd, record["token"]
        return record

    def release(self) -> None:
        fd, self._fd, self.token = self._fd, None, None
        if fd is None:
            return
        try:
            os.ftruncate(fd, 0)  # readers see no holder from here on
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def holder(self) -> dict[str, Any] | None:
        try:
            record = parse_record(self.local_path.read_text())
        except OSError:
            return None
        if record is None:
            return None
        if self._fd is not None:
            return record
        try:
            fd = os.open(self.local_path, os.O_RDONLY)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return record  # someone holds it exclusively: the record is theirs
        finally:
            os.close(fd)  # closing drops the shared probe lock, if we got it
        return None  # a record left by a holder that died: nobody holds the lock

    def _open(self) -> int:
        try:
            self.local_path.parent.mkdir(parents=True, exist_ok=True)
            return os.open(self.local_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise StoreError(f"cannot open the store lock {self.path}: {e.strerror or e}") from None

    def _same_file(self, fd: int) -> bool:
        try:
            return os.fstat(fd).st_ino == os.stat(self.local_path).st_ino
        except FileNotFoundError:
            return False


def lock_for(local_root: Path | None, fs: Any = None, root: str = "", url: str = "") -> StoreLock:
    """The lock of a store: a kernel lock on local disks, a lease elsewhere."""
    if local_root is not None:
        return FileLock(local_root)
    from pflatents.storage.lease import LeaseLock

    return LeaseLock(fs, root, url)
