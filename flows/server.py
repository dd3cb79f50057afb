"""Prefect's process environment for every pflatents command.

``prefect_env()`` sets quiet, offline-safe defaults before prefect is imported (a user's own
settings win: only unset variables are filled).
"""

from __future__ import annotations

import os

__all__ = ["prefect_env"]


def prefect_env() -> None:
    """Quiet, offline-safe Prefect defaults (call before prefect is imported)."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    # OpenMP's spin-waiting threads made 2-thread torch 20-50x slower whenever another process
    # competed for the cores (measured, benchmarks/solvers.py); passive waiting costs nothing alone.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
