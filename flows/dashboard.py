"""What a pflatents run shows in Prefect's dashboard, and what happens when the Prefect server goes away.

- **Names and tags**: flow runs are named from their job (``extract s.zarr: 200000 samples, 40
  shards``, ``resume s.zarr: ...``, ``analyze s.zarr``), task runs from their shards (``integrate
  shards 8-15``), and every run is tagged ``store:<name>`` and ``model:<kind>`` so the dashboard's
  filters find a store's runs.
- **Logs**: ``logging_env`` (called by ``prefect_env`` before Prefect is imported) lets INFO lines
  of flow and task runs through to the Prefect API (the dashboard's Logs tab) while the terminal's
  handler keeps showing warnings and errors only, as before. A user's own ``PREFECT_LOGGING_*``
  settings win.
- **The extract table**: ``extract_table`` is the artifact the extract flow publishes.
- **A server that goes away**: ``ServerWatch`` polls the server's health while a flow runs. When it
  stops answering, one warning names it and says that the store keeps the truth; Prefect's retries
  of events, API logs and client calls are cut short and their messages dropped (counted; ``--debug``
  shows them); the flow's own dashboard updates are skipped. The caller then decides from the store
  whether the job finished.

Nothing here imports Prefect at module level: ``logging_env`` runs before Prefect is imported.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import urllib.request
from typing import Any, Callable, Iterable

__all__ = ["logging_env", "store_name", "shard_label", "run_name", "shards_run_name", "job_run_name", "run_tags", "untagged", "tasks_untagged", "log_analysis", "extract_table",
           "ServerWatch", "ServerGone", "run_watched", "server_lost", "probe", "SLOW_S", "publish", "hand_over", "show_traceback", "is_server_error", "healthy", "warn", "quiet", "results", "NOISE"]

# Set by the CLI: without --debug, Prefect's messages about a lost server are dropped (and counted).
quiet: list[bool] = [True]

# Process-local results of flow bodies that finished while the server was gone (the engine then
# fails to record the flow's final state, so the caller cannot get the return value): key -> value.
results: dict[str, Any] = {}


def logging_env() -> None:
    """INFO run logs to the API, the terminal as quiet as before (call before prefect is imported)."""
    if "PREFECT_LOGGING_LEVEL" not in os.environ:
        # The CLI's default level is WARNING (prefect_env); keep the terminal there, but let the
        # flow- and task-run loggers pass INFO to their API handler (the dashboard's Logs tab).
        os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")
        os.environ.setdefault("PREFECT_LOGGING_LOGGERS_PREFECT_FLOW_RUNS_LEVEL", "INFO")
        os.environ.setdefault("PREFECT_LOGGING_LOGGERS_PREFECT_TASK_RUNS_LEVEL", "INFO")


# ---- names and tags --------------------------------------------------------------------------

def store_name(url: str) -> str:
    """The last part of a store's path or URL (``/data/s.zarr`` -> ``s.zarr``)."""
    return url.rstrip("/").rsplit("/", 1)[-1] or url


def shard_label(ids: Iterable[int]) -> str:
    """Shard ids as ranges: ``[8, 9, 10, 12]`` -> ``8-10, 12``."""
    from pflatents.storage.layout import shard_label as label

    return label(ids)


def run_name(text: str) -> str:
    """A run name Prefect takes literally (it formats names with the run's parameters: braces escaped)."""
    return text.replace("{", "{{").replace("}", "}}")


def shards_run_name(verb: str, ids: list[int]) -> str:
    """``integrate shards 8-15`` / ``integrate shard 3`` (escaped for Prefect)."""
    return run_name(f"{verb} shard{'s' if len(ids) > 1 else ''} {shard_label(ids)}")


def job_run_name(command: str, url: str, n_samples: int, n_shards: int) -> str:
    """``extract s.zarr: 200000 samples, 40 shards`` (escaped for Prefect)."""
    s = "" if n_shards == 1 else "s"
    return run_name(f"{command} {store_name(url)}: {n_samples} samples, {n_shards} shard{s}")


def run_tags(url: str, model_kind: str | None = None) -> list[str]:
    """Tags a dashboard filter finds a store's runs by: ``store:s.zarr``, ``model:gmm``."""
    tags = ["pflatents", f"store:{store_name(url)}"]
    if model_kind:
        tags.append(f"model:{model_kind}")
    return tags


def untagged():
    """Context for submitting task runs without the flow run's tags: Prefect takes a tag-concurrency
    slot from the server for every tagged task run (an API call per task, and a crash of the task
    when the server is gone). The flow run keeps its tags; its task runs are found through it."""
    from prefect.context import TagsContext

    return TagsContext(current_tags=set())


def tasks_untagged(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate a flow function (under ``@flow``) so that its task runs are submitted ``untagged``."""
    import functools

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        with untagged():
            return fn(*args, **kwargs)

    return run


def log_analysis(summary: dict) -> None:
    """The analyze flow's INFO lines: its verdict, where the analysis and the report are."""
    from prefect.logging import get_run_logger

    logger = get_run_logger()
    logger.info(f"analysed {summary.get('store')}: {summary.get('rows_note')}")
    logger.info(str(summary.get("verdict")))
    report = (summary.get("report") or {}).get("html")
    logger.info(f"analysis stored in {summary.get('store')} (group `analysis`)" + (f"; report: {report}" if report else ""))


# ---- the extract table -----------------------------------------------------------------------

def _solver_text(solver: dict) -> str:
    keys = [k for k in ("rtol", "atol", "control", "steps", "grid", "t_eps") if solver.get(k) is not None]
    return " ".join([str(solver.get("name", "?"))] + [f"{k}={solver[k]}" for k in keys])


def extract_table(summary: dict, store_url: str, config: dict, n_shards_store: int) -> list[dict[str, str]]:
    """The extract flow's table artifact: one row per figure (``what``, ``value``)."""
    failed = summary.get("failed_shards") or []
    nfe = summary.get("nfe") or {}
    rows = [
        ("store", store_url),
        ("shards done", f"{summary['shards'] - len(failed)} of {summary['shards']} run "
                        f"({n_shards_store} in the store)"),
        ("shards failed", f"{len(failed)}" + (f": {shard_label(failed)} (`pflatents resume {store_url}`)"
                                              if failed else "")),
        ("samples", f"{summary['samples']}"),
        ("samples flagged", f"{summary.get('samples_failed', 0)} (step limit or non-finite: NaN latents)"),
        ("NFE per sample", (f"mean {nfe['mean']:.1f}, std {nfe['std']:.1f}, min {nfe['min']}, max {nfe['max']}"
                            if nfe else "-")),
        ("throughput", f"{summary['samples_per_s']:.0f} samples/s ({summary['seconds']:.1f} s)"),
        ("tasks", f"{summary['tasks']} of {summary['shards_per_task']} shard(s) each"),
        ("solver (pinned)", _solver_text(config.get("solver") or {})),
        ("dtype / network precision", f"{config.get('dtype')} / {config.get('precision')}"),
        ("model", f"{(config.get('model') or {}).get('spec')}"),
        ("devices", ", ".join(summary.get("devices") or []) or "-"),
    ]
    return [{"what": k, "value": v} for k, v in rows]


# ---- a server that goes away -----------------------------------------------------------------

# Substrings of Prefect's messages that say it cannot reach its server.
NOISE = ("Unable to connect to", "failed to process item", "Error logging to API", "ConnectError",
         "Connection refused", "All connection attempts failed", "Failed to reach API", "ConnectTimeout",
         "Connect call failed", "Still processing items", "failed with", "Crash detected")

_current: list["ServerWatch"] = []
SLOW_S = 60.0  # a server that has not answered a health check for this long counts as gone


def server_lost() -> bool:
    """Whether the server of the run in progress stopped answering (skip dashboard-only API calls)."""
    return bool(_current) and _current[-1].lost.is_set()


def publish(call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """A dashboard-only API call (an artifact): skipped once the server is lost, never fatal for want of
    a server (the store, not the dashboard, decides what is done)."""
    if server_lost():
        return None
    try:
        return call(*args, **kwargs)
    except Exception as e:  # noqa: BLE001
        if not is_server_error(e):
            raise
        return None


def hand_over(key: str, value: Any) -> None:
    """At the end of a flow body, from the flow's own thread: if the server is lost, keep the flow's
    outcome for the caller (the engine cannot record it on the lost server) and make the engine's
    remaining calls fail at once."""
    if server_lost():
        results[key] = value
        _current[-1].fail_fast()


def run_watched(flow: Any, kwargs: dict, store_url: str, tags: list[str], what: str, again: str,
                api_url: str | None) -> Any:
    """Call ``flow(**kwargs)`` tagged and under a ``ServerWatch``. If the server goes away, the flow's
    result still comes back when its body finished (``hand_over``); otherwise a ``ServerGone`` error
    says what to run ``again``."""
    from prefect import tags as prefect_tags

    from pflatents.flows.server import resume_gc

    resume_gc()  # the command's start-up is over (pause_gc)
    with ServerWatch(api_url, store_url, what) as watch:
        try:
            with prefect_tags(*tags):
                return flow(**kwargs)
        except Exception as e:
            if not (watch.lost.is_set() or is_server_error(e)):
                raise
            show_traceback()
            if store_url in results:
                return results.pop(store_url)
            state = "went away during" if watch.lost.is_set() else "did not answer for"
            raise ServerGone(f"the Prefect server at {watch.api_url} {state} the {what}, which did not finish; "
                             f"run {again}{watch.dropped_note()}") from None


class ServerGone(RuntimeError):
    """The Prefect server went away before a flow could finish; the message says what to run again."""


def show_traceback() -> None:
    """Under ``--debug``, the traceback of the exception being handled (on stderr)."""
    if not quiet[0]:
        import traceback

        traceback.print_exc()


def warn(msg: str) -> None:
    """A warning through the CLI's stderr printer, else through Python logging (library use)."""
    from pflatents.flows.server import note_printers

    if note_printers:
        note_printers[0](msg)
    else:
        logging.getLogger("pflatents").warning(msg)


def is_server_error(exc: BaseException | None) -> bool:
    """Whether ``exc`` (or an exception it was raised from) says the Prefect API cannot be reached."""
    seen = 0
    while exc is not None and seen < 10:
        name = type(exc).__name__
        if name in ("ConnectError", "ConnectTimeout", "ReadError", "WriteError", "RemoteProtocolError",
                    "PoolTimeout", "ReadTimeout") or isinstance(exc, ConnectionError):
            return True
        if isinstance(exc, RuntimeError) and "Failed to reach API" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


def healthy(api_url: str, timeout: float = 1.0) -> bool:
    """Whether the Prefect API at ``api_url`` answers its health check within ``timeout`` seconds."""
    return probe(api_url, timeout) == "ok"


def probe(api_url: str, timeout: float = 5.0) -> str:
    """``ok``; ``gone`` (the connection is refused or reset: nothing listens any more); ``slow`` (no
    answer in time: a busy machine, or a hung server)."""
    try:
        with urllib.request.urlopen(api_url.rstrip("/") + "/health", timeout=timeout) as r:
            return "ok" if r.status == 200 else "slow"
    except (ConnectionRefusedError, ConnectionResetError):
        return "gone"
    except OSError as e:
        reason = getattr(e, "reason", None)
        return "gone" if isinstance(reason, (ConnectionRefusedError, ConnectionResetError)) else "slow"


class _Drop(logging.Filter):
    """Drops (and counts) Prefect's records about an unreachable server; the first one trips the watch."""

    def __init__(self, watch: "ServerWatch") -> None:
        super().__init__()
        self.watch = watch

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith("prefect"):
            return True
        try:
            text = record.getMessage()
        except Exception:  # noqa: BLE001 - a record that cannot format is not ours to judge
            return True
        exc = record.exc_info[1] if record.exc_info else None
        if not (any(s in text for s in NOISE) or is_server_error(exc)):
            return True
        if not self.watch.lost.is_set() and probe(self.watch.api_url) == "gone":
            self.watch.lose()
        if self.watch.lost.is_set() and quiet[0]:
            self.watch.dropped += 1
            return False
        return True


class _StderrGate:
    """Wraps sys.stderr while a server is watched: once it is lost, Prefect's log worker's two writes
    per failed batch ("--- Error logging to API ---" and the error text) are dropped (counted)."""

    def __init__(self, stream, watch: "ServerWatch") -> None:
        self.stream, self.watch, self.skip_next = stream, watch, False

    def write(self, s: str) -> int:
        if (quiet[0] and s.startswith("--- Error logging to API") and not self.watch.lost.is_set()
                and probe(self.watch.api_url) == "gone"):
            self.watch.lose()  # the log worker failed before the health watch noticed: same check
        if self.watch.lost.is_set() and quiet[0]:
            if s.startswith("--- Error logging to API"):
                self.watch.dropped += 1
                self.skip_next = True
                return len(s)
            if self.skip_next:
                self.skip_next = False
                return len(s)
        return self.stream.write(s)

    def __getattr__(self, name: str):
        return getattr(self.stream, name)


class ServerWatch:
    """While a flow runs against ``api_url``: notice the server going away, say so once, quiet Prefect.

    ``with ServerWatch(api_url, store_url) as w: ...``; ``w.lost`` is set once the server refused two
    health checks in a row (polled every ``interval`` s) or answered none for ``SLOW_S`` seconds, or
    Prefect logged that it cannot reach it and the connection is refused.
    ``api_url`` None (Prefect's temporary server, which lives in this process) watches nothing.
    """

    def __init__(self, api_url: str | None, store_url: str, what: str = "run", interval: float = 1.0) -> None:
        self.api_url, self.store_url, self.what, self.interval = api_url, store_url, what, interval
        self.lost = threading.Event()
        self.dropped = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._undo: list[Callable[[], None]] = []
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "ServerWatch":
        if not self.api_url:
            return self
        import sys

        _current.append(self)
        flt = _Drop(self)
        targets = [logging.getLogger(), logging.getLogger("prefect._internal")]
        handlers = {h for lg in targets for h in lg.handlers}
        for h in handlers:
            h.addFilter(flt)
        self._undo.append(lambda: [h.removeFilter(flt) for h in handlers])
        gate, before = _StderrGate(sys.stderr, self), sys.stderr
        sys.stderr = gate
        self._undo.append(lambda: setattr(sys, "stderr", before) if sys.stderr is gate else None)
        self._thread = threading.Thread(target=self._poll, name="pflatents-server-watch", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if not self.api_url:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self in _current:
            _current.remove(self)
        # A lost server stays silenced in this process (what Prefect still queues for it would be
        # retried, loudly, at exit) unless it answers again by now.
        if not self.lost.is_set() or healthy(self.api_url):
            self.restore()

    def _poll(self) -> None:
        """Lost after two refused connections in a row, or no answer at all for ``SLOW_S`` seconds (a
        busy machine answers late: a slow health check alone is no reason)."""
        refused, last_ok = 0, time.monotonic()
        while not self._stop.wait(self.interval):
            state = probe(self.api_url, timeout=5.0)
            if state == "ok":
                refused, last_ok = 0, time.monotonic()
                continue
            refused = refused + 1 if state == "gone" else 0
            if refused >= 2 or time.monotonic() - last_ok > SLOW_S:
                self.lose()
                return

    def lose(self) -> None:
        """Mark the server lost (once): warn, stop Prefect's event and log workers, cut client retries."""
        with self._lock:
            if self.lost.is_set():
                return
            self.lost.set()
        warn(f"pflatents: warning: the Prefect server at {self.api_url} stopped answering during the {self.what}; "
             f"the work goes on without it (the dashboard misses the rest of this run). The store keeps the "
             f"truth: `pflatents status {self.store_url}`")
        self._undo.append(_silence_prefect())
        self.fail_fast()

    def fail_fast(self) -> None:
        """Prefect's client retries a refused connection for about a minute per call: once the server
        is gone, calls fail at once (this thread's settings and the process environment)."""
        before_env = os.environ.get("PREFECT_CLIENT_MAX_RETRIES")
        os.environ["PREFECT_CLIENT_MAX_RETRIES"] = "0"
        self._undo.append(lambda: os.environ.pop("PREFECT_CLIENT_MAX_RETRIES", None) if before_env is None
                          else os.environ.__setitem__("PREFECT_CLIENT_MAX_RETRIES", before_env))
        try:
            from prefect.settings import get_current_settings

            client = get_current_settings().client
            before = client.max_retries
            client.max_retries = 0
            self._undo.append(lambda: setattr(client, "max_retries", before))
        except Exception:  # noqa: BLE001 - another Prefect version: its retries run their course
            pass

    def restore(self) -> None:
        """Undo the filters, the stderr gate and the retry setting (after the caller has reported)."""
        for undo in reversed(self._undo):
            try:
                undo()
            except Exception:  # noqa: BLE001
                pass
        self._undo.clear()

    def dropped_note(self) -> str:
        if not self.dropped:
            return ""
        return f" ({self.dropped} messages of Prefect about the unreachable server were left out; --debug shows them)"


async def _drop_item(*args: Any, **kwargs: Any) -> None:
    return None


def _silence_prefect() -> Callable[[], None]:
    """Prefect's event and API-log workers would retry every queued item against the lost server
    (seconds each, also while the process exits): they drop their items until the returned undo."""
    try:
        from prefect._internal.concurrency.services import QueueService
        from prefect.events.worker import EventsWorker
        from prefect.logging.handlers import APILogWorker
    except ImportError:
        return lambda: None
    patched = []
    for svc in list(getattr(QueueService, "_instances", {}).values()):
        name = "_handle" if isinstance(svc, EventsWorker) else "_handle_batch" if isinstance(svc, APILogWorker) else None
        if name:
            setattr(svc, name, _drop_item)
            patched.append((svc, name))

    def undo() -> None:
        for svc, name in patched:
            svc.__dict__.pop(name, None)

    return undo
