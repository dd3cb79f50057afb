"""A seeded train / held-out split of a source's rows, recorded so that analysis can rebuild it.

The rule: ``numpy.random.default_rng([seed, 2013]).permutation(n)``; its first ``round(fraction * n)``
entries are held out, the rest are trained on (both sorted). The record stored in a checkpoint's
``config.json`` (``data.holdout``) names the source's fingerprint, the fraction and the seed, and a
digest of the held-out indices, so a reader can check that it rebuilt the same split on the same data.
Pure numpy.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import numpy as np

from pflatents.tasks.errors import InputError

__all__ = ["holdout_split", "split_record", "split_from_record"]

RULE = "numpy.random.default_rng([seed, 2013]).permutation(n)[:round(fraction * n)] are held out"


def holdout_split(n: int, fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, held-out rows), sorted int64; ``fraction`` of the ``n`` rows are held out.

    Raises:
        InputError: ``fraction`` is not in [0, 1), or it leaves no training row or no held-out row.
    """
    if not (isinstance(fraction, (int, float)) and math.isfinite(fraction) and 0 <= fraction < 1):
        raise InputError(f"--holdout must be a fraction in [0, 1); got {fraction!r}")
    k = int(round(fraction * n))
    if fraction > 0 and (k == 0 or k == n):
        raise InputError(f"--holdout {fraction} of {n} samples leaves {k} held-out and {n - k} training "
                         "samples; choose a fraction that leaves at least one of each")
    perm = np.random.default_rng([int(seed), 2013]).permutation(n)
    return np.sort(perm[k:]).astype(np.int64), np.sort(perm[:k]).astype(np.int64)


def _digest(rows: np.ndarray) -> str:
    return "sha256:" + hashlib.sha256(np.asarray(rows, dtype="<i8").tobytes()).hexdigest()


def split_record(n: int, fraction: float, seed: int, fingerprint: str) -> dict[str, Any]:
    """The JSON record of a split of ``n`` rows of the data with ``fingerprint``."""
    train, held = holdout_split(n, fraction, seed)
    return {"fraction": float(fraction), "seed": int(seed), "n_samples": int(n), "n_train": int(len(train)),
            "n_heldout": int(len(held)), "rule": RULE, "fingerprint": fingerprint,
            "heldout_digest": _digest(held)}


def split_from_record(record: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """Rebuild (train rows, held-out rows) from a record; checks the held-out digest.

    Raises:
        InputError: the rebuilt held-out rows do not match the record's digest.
    """
    train, held = holdout_split(int(record["n_samples"]), float(record["fraction"]), int(record["seed"]))
    if _digest(held) != record.get("heldout_digest"):
        raise InputError("the recorded train/held-out split cannot be rebuilt (digest mismatch): "
                         "the checkpoint was written by a different split rule")
    return train, held
