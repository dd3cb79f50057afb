"""Process-local progress hooks the CLI registers for its progress bar.

Kept in their own module: the extract flow refers to them through this module (pickled by
reference), so the flow can be shipped to dask workers without dragging a live progress bar along.
"""

from __future__ import annotations

from typing import Callable

# Callbacks (n_samples_done_in_shard, info) called by the extract flow as each shard finishes.
hooks: list[Callable[[int, dict], None]] = []
