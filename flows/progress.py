"""Progress reporting: the extract flow's process-local hooks and the one rich progress bar.

The hooks list lives in this small module on its own: the extract flow refers to it through this
module (pickled by reference), so the flow can be shipped to dask workers without dragging a live
progress bar along. ``bar`` is the terminal bar the CLI shows for extraction (samples) and for
training (steps, with the smoothed loss).
"""

from __future__ import annotations

import time
from typing import Any, Callable

__all__ = ["hooks", "bar", "steps", "step_done"]

# Callbacks (n_samples_done_in_shard, info) called by the extract flow as each shard finishes.
hooks: list[Callable[[int, dict], None]] = []

# Callbacks (name) called by the analyze flow as each of its steps ends.
steps: list[Callable[[str], None]] = []


def step_done(name: str) -> None:
    """Tell the registered ``steps`` callbacks that a step of a flow ended."""
    for hook in list(steps):
        hook(name)


class bar:
    """A rich progress bar on stderr (stdout keeps the command's result, e.g. ``--json``); ``with
    bar(total, "encoding") as update`` yields ``update(advance=0, completed=None, **fields)``.

    ``fields`` names extra columns shown as ``name value`` (e.g. ``loss``); with ``disabled`` the
    update is a no-op and nothing is printed. Updates with fields are throttled to 10 per second.
    ``rows`` (label, total) are extra rows above the main one (the extract's pilot step); their updaters
    are ``update.rows[label](completed=..., total=...)``.
    """

    def __init__(self, total: int, label: str, disabled: bool = False, fields: tuple[str, ...] = (),
                 rows: tuple[tuple[str, int], ...] = ()) -> None:
        self.total, self.label, self.disabled, self.fields, self.rows = total, label, disabled, fields, rows

    def __enter__(self) -> Callable[..., None]:
        if self.disabled:
            noop: Any = lambda *a, **k: None  # noqa: E731
            noop.rows = {label: noop for label, _ in self.rows}
            return noop
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        extra = [TextColumn(f"{f} {{task.fields[{f}]}}") for f in self.fields]
        self.p = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), *extra, TimeRemainingColumn(),
                          console=Console(stderr=True))
        self.p.start()
        rows = {label: self._row(self.p.add_task(label, total=n, **dict.fromkeys(self.fields, "")))
                for label, n in self.rows}
        tid = self.p.add_task(self.label, total=self.total, **dict.fromkeys(self.fields, "-"))
        last = [0.0]

        def update(advance: int = 0, completed: int | None = None, **fields) -> None:
            if fields:
                now = time.monotonic()
                if now - last[0] < 0.1 and completed != self.total:
                    return
                last[0] = now
            self.p.update(tid, advance=advance or None, completed=completed, **fields)

        update.rows = rows  # type: ignore[attr-defined]
        return update

    def _row(self, tid) -> Callable[..., None]:
        """The updater of an extra row: ``row(completed=..., total=...)``."""
        def row(advance: int = 0, completed: int | None = None, total: int | None = None) -> None:
            self.p.update(tid, advance=advance or None, completed=completed, total=total)

        return row

    def __exit__(self, *exc) -> None:
        if not self.disabled:
            self.p.stop()
