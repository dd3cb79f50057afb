"""Typed errors for user-facing input problems (bad data, bad model files, bad solver settings).

The CLI turns any ``InputError`` into one or two plain lines on stderr (no traceback), so messages
must name the problem and the offending value, index or file.
"""

from __future__ import annotations

__all__ = ["InputError", "DataError", "ModelError", "SolverError"]


class InputError(ValueError):
    """A problem with what the user gave us (files, parameters); never a bug in pflatents."""


class DataError(InputError):
    """The dataset cannot be used: missing, unreadable, empty, wrong dtype, NaN/Inf, odd shapes."""


class ModelError(InputError):
    """The model file or its parameters are invalid (malformed JSON, non-SPD covariance, ...)."""


class SolverError(InputError):
    """Solver settings are invalid (unknown name, rtol/atol <= 0, t_eps outside (0, T), ...)."""
