"""Model specs -> score models, loaded once per process.

``MODEL`` specs: ``gmm:params.json`` (exact analytic score of a Gaussian mixture). Checkpoints of
``pflatents train`` and ``diffusers:DIR`` plug in here too. Nothing loaded is ever executed:
models are JSON / safetensors, never pickles.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import torch

from tasks.errors import ModelError
from tasks.scores import GaussianMixtureScore, ScoreModel
from tasks.sde import SDE

__all__ = ["ModelInfo", "resolve_model_spec", "model_info", "load_model", "resolve_device"]

PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".bin")


@dataclass(frozen=True)
class ModelInfo:
    """What the store pins about a model: its spec, kind, content hash and data dimension."""

    spec: str
    kind: str
    content_hash: str
    dim: int | None

    def to_dict(self) -> dict:
        return {"spec": self.spec, "kind": self.kind, "content_hash": self.content_hash, "dim": self.dim}


def resolve_model_spec(spec: str) -> str:
    """Normalise a spec: make file paths absolute so a resume from another directory finds them."""
    kind, sep, rest = spec.partition(":")
    if not sep:
        raise ModelError(f"model spec {spec!r} needs a kind prefix, e.g. 'gmm:params.json'")
    if kind == "gmm":
        return f"gmm:{Path(rest).expanduser().resolve()}"
    _refuse_pickle(rest)
    raise ModelError(f"unknown model kind {kind!r} in {spec!r}; supported: gmm:PATH.json")


def _refuse_pickle(path: str) -> None:
    if path.endswith(PICKLE_SUFFIXES):
        raise ModelError(f"refusing to load {path!r}: pickled checkpoints can execute code; "
                         "give a safetensors + JSON checkpoint or a gmm:params.json model")


def _file_stamp(path: str) -> tuple:
    """(mtime_ns, size) of a model file, so an edited file is never served from the cache."""
    try:
        st = Path(path).stat()
        return (st.st_mtime_ns, st.st_size)
    except OSError:
        return ()


@functools.lru_cache(maxsize=8)
def _load_cached(spec: str, sde: SDE, stamp: tuple) -> GaussianMixtureScore:
    kind, _, rest = spec.partition(":")
    if kind == "gmm":
        return GaussianMixtureScore.from_json(rest, sde)
    raise ModelError(f"unknown model kind {kind!r}")


def _load(spec: str, sde: SDE) -> GaussianMixtureScore:
    return _load_cached(spec, sde, _file_stamp(spec.partition(":")[2]))


def load_model(spec: str, sde: SDE) -> ScoreModel:
    """The score model for a spec; cached, so a worker process loads each model once."""
    return _load(resolve_model_spec(spec), sde)


def model_info(spec: str, sde: SDE) -> ModelInfo:
    """Load (cached) and describe a model for the store's pinned config."""
    spec = resolve_model_spec(spec)
    m = _load(spec, sde)
    return ModelInfo(spec=spec, kind=spec.partition(":")[0], content_hash=m.content_hash, dim=getattr(m, "dim", None))


def resolve_device(device: str) -> torch.device:
    """'auto' -> cuda when available, else cpu; 'cuda' without a GPU is a clear error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"device {device!r} asked for, but torch sees no CUDA GPU here (use --device cpu or auto)")
    try:
        return torch.device(device)
    except RuntimeError:
        raise ModelError(f"unknown device {device!r}; use auto, cpu or cuda[:N]") from None
