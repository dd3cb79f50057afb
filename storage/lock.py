"""A store-level lock so two extract processes never run on one store at the same time.

Local paths: a lock file created atomically (``O_CREAT | O_EXCL``) holding host, pid, process
start time and a token. A lock whose holder is on this host and is dead (or whose pid now belongs
to another process) is stale and is taken over; any other holder raises ``StoreLockedError``.
fsspec URLs: best effort, a lock object with a lease time (no atomic create on object stores).
A holder on this host that is dead (pid gone or reused, checked against its start time) is taken
over at once, so ``resume`` right after a SIGKILL works; a holder on another host is taken over
only when its lease ran out. The holder renews its lease from a background thread
(``keep_alive``) every ``lease_s / 5``, so the lease (``$PFLATENTS_LOCK_LEASE_S``, default 600 s)
bounds how long a crashed remote holder blocks the store, not how long a run may take.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pflatents.storage.config import to_json
from pflatents.storage.errors import StoreError, StoreLockedError

__all__ = ["StoreLock", "pid_alive"]

LOCK_KEY = "lock/owner.json"
LEASE_ENV = "PFLATENTS_LOCK_LEASE_S"


def _default_lease() -> float:
    """Lease of fsspec locks in seconds (``$PFLATENTS_LOCK_LEASE_S``, default 600)."""
    try:
        return max(1.0, float(os.environ.get(LEASE_ENV) or 600.0))
    except ValueError:
        return 600.0


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
    """True if process ``pid`` runs on this host (not a zombie, and started at ``start``)."""
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


class StoreLock:
    """Exclusive lock of one store; ``acquire`` / ``release`` or use it as a context manager."""

    def __init__(self, local_root: Path | None, fs: Any = None, root: str = "",
                 url: str = "", lease_s: float | None = None) -> None:
        self.local_path = local_root / LOCK_KEY if local_root is not None else None
        self.fs, self.remote_path = fs, f"{root.rstrip('/')}/{LOCK_KEY}"
        self.lease_s = float(lease_s) if lease_s is not None else _default_lease()
        self._stop_refresh: threading.Event | None = None
        self._mutex = threading.Lock()  # a renewal never rewrites a lock that release removed
        self.url = f"{url.rstrip('/')}/{LOCK_KEY}" if url else self.remote_path
        self.token: str | None = None

    @property
    def path(self) -> str:
        """Where the lock object lives (the file to remove by hand if its holder is gone)."""
        return str(self.local_path) if self.local_path is not None else self.url

    def _record(self, owner: dict[str, Any] | None) -> dict[str, Any]:
        """The holder record written into the lock object."""
        pid = os.getpid()
        return {"host": socket.gethostname(), "pid": pid, "pid_start": process_start(pid),
                "token": uuid.uuid4().hex, "acquired": _now(),
                "lease_until": time.time() + self.lease_s, "owner": to_json(owner or {}, "owner")}

    def holder(self) -> dict[str, Any] | None:
        """The current holder record, or None when unlocked (or unreadable)."""
        text = self._read()
        try:
            return json.loads(text) if text else None
        except ValueError:
            return None

    def acquire(self, owner: dict[str, Any] | None = None) -> dict[str, Any]:
        """Take the lock or raise ``StoreLockedError`` naming the live holder."""
        record = self._record(owner)
        for _ in range(5):
            try:
                created = self._create(json.dumps(record))
            except OSError as e:
                raise StoreError(f"cannot write the store lock {self.path}: {e.strerror or e}") from None
            if created:
                self.token = record["token"]
                return record
            text = self._read()
            if text is None:
                continue
            holder = _parse(text)
            if holder is not None and not self._stale(holder):
                raise StoreLockedError(self._message(holder))
            self._take_over(text)
        raise StoreLockedError(f"could not take the store lock {self.path}: "
                               f"other processes race for it")

    def keep_alive(self) -> None:
        """Renew the lease every ``lease_s / 5`` from a daemon thread until ``release``."""
        if self.local_path is not None or self.token is None or self._stop_refresh is not None:
            return
        stop = self._stop_refresh = threading.Event()

        def renew() -> None:
            while not stop.wait(self.lease_s / 5):
                with self._mutex:
                    if stop.is_set():
                        return
                    try:
                        self.refresh()
                    except (StoreLockedError, OSError):
                        return  # taken over or unreachable: the run learns it at release

        threading.Thread(target=renew, name="pflatents-lock-lease", daemon=True).start()

    def release(self) -> None:
        """Release the lock if this object still holds it (no-op otherwise)."""
        with self._mutex:
            if self._stop_refresh is not None:
                self._stop_refresh.set()
                self._stop_refresh = None
            holder = self.holder()
            if self.token is not None and holder is not None and holder.get("token") == self.token:
                self._remove()
            self.token = None

    def refresh(self) -> None:
        """Extend the lease of a held lock (fsspec locks; harmless for local ones)."""
        holder = self.holder()
        if self.token is None or holder is None or holder.get("token") != self.token:
            raise StoreLockedError(f"store lock {self.path} is no longer held by this process")
        holder["lease_until"] = time.time() + self.lease_s
        self._write(json.dumps(holder))

    def __enter__(self) -> StoreLock:
        if self.token is None:
            self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def _stale(self, holder: dict[str, Any]) -> bool:
        """A holder is stale if it is dead on this host, or (fsspec only) its lease ran out."""
        if holder.get("host") == socket.gethostname():
            if not pid_alive(int(holder.get("pid", -1)), holder.get("pid_start")):
                return True
        return self.local_path is None and time.time() > float(holder.get("lease_until", 0))

    def _message(self, holder: dict[str, Any]) -> str:
        """Two lines: who holds the lock, and which file to remove if they are sure."""
        return (f"store is locked by pid {holder.get('pid')} on host {holder.get('host')} "
                f"since {holder.get('acquired')} (another extract/resume is running)\n"
                f"if you are sure that process is gone, remove {self.path}")

    def _create(self, text: str) -> bool:
        """Create the lock object if absent (atomic for local paths); True on success."""
        if self.local_path is None:
            if self.fs.exists(self.remote_path):
                return False
            self._write(text)
            return True
        self.local_path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.local_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        return True

    def _take_over(self, stale_text: str) -> None:
        """Remove the stale lock; if another process replaced it meanwhile, put theirs back."""
        if self.local_path is None:
            self._remove()
            return
        grave = self.local_path.with_name(f"{self.local_path.name}.stale-{uuid.uuid4().hex}")
        try:
            os.rename(self.local_path, grave)
        except FileNotFoundError:
            return
        if grave.read_text() != stale_text:
            try:
                os.link(grave, self.local_path)
            except FileExistsError:
                pass
        grave.unlink()

    def _read(self) -> str | None:
        """Text of the lock object, or None if absent. Waits briefly for a half-written file."""
        for _ in range(20):
            try:
                if self.local_path is not None:
                    text = self.local_path.read_text()
                else:
                    text = self.fs.cat_file(self.remote_path).decode()
            except (FileNotFoundError, KeyError):
                return None
            if _parse(text) is not None:
                return text
            time.sleep(0.05)
        return text

    def _write(self, text: str) -> None:
        """Overwrite the lock object (fsspec, or a refresh of a held local lock)."""
        if self.local_path is not None:
            tmp = self.local_path.with_name(f"{self.local_path.name}.{uuid.uuid4().hex}.tmp")
            tmp.write_text(text)
            os.replace(tmp, self.local_path)
        else:
            self.fs.pipe_file(self.remote_path, text.encode())

    def _remove(self) -> None:
        """Delete the lock object if present."""
        try:
            if self.local_path is not None:
                self.local_path.unlink()
            else:
                self.fs.rm_file(self.remote_path)
        except FileNotFoundError:
            pass


def _parse(text: str) -> dict[str, Any] | None:
    """Parse a lock record; None if the text is not a complete record."""
    try:
        record = json.loads(text)
    except ValueError:
        return None
    return record if isinstance(record, dict) and "pid" in record else None
