"""Model specs -> score models, loaded once per process.

``MODEL`` specs:

- ``gmm:params.json``: the exact analytic score of a Gaussian mixture;
- a checkpoint directory written by ``pflatents train`` (``config.json`` + ``model.safetensors``),
  given as its path or as ``ckpt:DIR``;
- ``diffusers:DIR``: a local diffusers ``UNet2DModel`` + scheduler config (optional extra).

Nothing loaded is ever executed: models are JSON / safetensors, never pickles. A pickle (by suffix
``.pt .pth .pkl .pickle .ckpt .bin``, or by content: a pickle stream or a ``torch.save`` zip) is refused
before any of its bytes are interpreted. Models that carry their own SDE (checkpoints, diffusers) say
so through ``native_sde``; the extraction then runs under it.
"""

from __future__ import annotations

import functools
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from pflatents.tasks.errors import ModelError
from pflatents.tasks.models.scores import GaussianMixtureScore, ScoreModel
from pflatents.tasks.ode.sde import SDE

__all__ = ["ModelInfo", "resolve_model_spec", "model_info", "load_model", "resolve_device", "native_sde",
           "is_pickle_file"]

PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".bin")
KINDS = "gmm:PATH.json, a checkpoint dir (or ckpt:DIR) written by `pflatents train`, diffusers:DIR"


@dataclass(frozen=True)
class ModelInfo:
    """What the store pins about a model: its spec, kind, content hash and data dimension."""

    spec: str
    kind: str
    content_hash: str
    dim: int | None

    def to_dict(self) -> dict:
        return {"spec": self.spec, "kind": self.kind, "content_hash": self.content_hash, "dim": self.dim}


def is_pickle_file(path: str | Path) -> bool:
    """True for a pickle stream (protocol 2+ header) or a torch.save zip archive (holds a .pkl)."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return False
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return True
    if head == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(path) as z:
                return any(n.endswith(".pkl") for n in z.namelist())
        except (zipfile.BadZipFile, OSError):
            return False
    return False


def _refuse_pickle(path: str | Path) -> None:
    p = Path(path)
    if str(path).endswith(PICKLE_SUFFIXES) or (p.is_file() and is_pickle_file(p)):
        raise ModelError(f"refusing to load {str(path)!r}: pickled checkpoints (torch.save) can execute code "
                         "when loaded; give a safetensors checkpoint dir written by `pflatents train`, "
                         "diffusers:DIR with .safetensors weights, or gmm:params.json")


def _abs(path: str) -> Path:
    return Path(path).expanduser().resolve()


def resolve_model_spec(spec: str) -> str:
    """Normalise a spec to ``kind:/absolute/path``, so a resume from another directory finds it."""
    plain = Path(spec).expanduser()
    if ":" not in spec or plain.exists():
        if plain.is_dir():
            from pflatents.tasks.models.checkpoint import is_checkpoint_dir

            if is_checkpoint_dir(plain):
                return f"ckpt:{plain.resolve()}"
            raise ModelError(f"{spec} is a directory without config.json: not a pflatents checkpoint "
                             "(a diffusers model is given as diffusers:DIR)")
        _refuse_pickle(spec)
        if plain.exists():
            raise ModelError(f"model {spec!r} is a file: give gmm:{spec} for a Gaussian mixture JSON, "
                             f"or one of: {KINDS}")
        raise ModelError(f"model {spec!r} not found; a model spec is one of: {KINDS}")
    kind, _, rest = spec.partition(":")
    if kind == "gmm":
        _refuse_pickle(rest)
        return f"gmm:{_abs(rest)}"
    if kind == "ckpt":
        _refuse_pickle(rest)
        if not _abs(rest).is_dir():
            raise ModelError(f"checkpoint directory not found: {rest}")
        return f"ckpt:{_abs(rest)}"
    if kind == "diffusers":
        _refuse_pickle(rest)
        return f"diffusers:{_abs(rest)}"
    _refuse_pickle(rest)
    raise ModelError(f"unknown model kind {kind!r} in {spec!r}; supported: {KINDS}")


def _file_stamp(spec: str) -> tuple:
    """(name, mtime_ns, size) of each file a model reads, so an edited model is never served from the cache."""
    kind, _, path = spec.partition(":")
    p = Path(path)
    files = [p] if kind == "gmm" else sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else []
    stamp = []
    for f in files:
        try:
            st = f.stat()
            stamp.append((str(f), st.st_mtime_ns, st.st_size))
        except OSError:
            pass
    return tuple(stamp)


@functools.lru_cache(maxsize=8)
def _load_cached(spec: str, sde: SDE, stamp: tuple) -> ScoreModel:
    kind, _, rest = spec.partition(":")
    if kind == "gmm":
        return GaussianMixtureScore.from_json(rest, sde)
    if kind == "ckpt":
        from pflatents.tasks.models.checkpoint import load_checkpoint

        return load_checkpoint(rest, sde)
    if kind == "diffusers":
        from pflatents.tasks.models.diffusers import load_diffusers

        return load_diffusers(rest, sde)
    raise ModelError(f"unknown model kind {kind!r}")


def _load(spec: str, sde: SDE) -> ScoreModel:
    return _load_cached(spec, sde, _file_stamp(spec))


def load_model(spec: str, sde: SDE, precision: str | None = None, compile: str = "off") -> ScoreModel:
    """The score model for a spec; cached, so a worker process loads each model once.

    ``precision`` / ``compile`` (``pflatents.tasks.models.precision``) set how a network is evaluated;
    the default (None, off) runs it in its own dtype, uncompiled. An exact (gmm) score runs in the
    state's dtype and takes only None, fp32 or fp64 (checked against the dtype by ``resolve_precision``).
    """
    spec = resolve_model_spec(spec)
    stamp = _file_stamp(spec)
    if precision is None and compile == "off":
        return _load_cached(spec, sde, stamp)
    return _configured(spec, sde, stamp, precision, compile)


@functools.lru_cache(maxsize=8)
def _configured(spec: str, sde: SDE, stamp: tuple, precision: str | None, compile: str) -> ScoreModel:
    """A shallow copy of the cached model whose network adapter runs at ``precision`` / ``compile``."""
    import copy

    from pflatents.tasks.models.adapters import DeviceNet
    from pflatents.tasks.models.precision import check_compile, check_precision

    check_precision(precision)
    check_compile(compile)
    base = _load_cached(spec, sde, stamp)
    net = getattr(base, "net", None)
    if not isinstance(net, DeviceNet):
        if precision in ("tf32", "bf16"):
            raise ModelError(f"--precision {precision} applies to networks; {spec} is an exact score "
                             "evaluated in the ODE state's dtype (use fp32 or fp64 with the matching --dtype)")
        return base
    model = copy.copy(base)
    model.net = net.with_settings(precision, compile)
    return model


def native_sde(spec: str) -> SDE | None:
    """The SDE a model was trained under (checkpoints, diffusers); None when it takes any (gmm)."""
    kind, _, rest = resolve_model_spec(spec).partition(":")
    if kind == "ckpt":
        from pflatents.tasks.models.checkpoint import checkpoint_sde

        return checkpoint_sde(rest)
    if kind == "diffusers":
        from pflatents.tasks.models.diffusers import diffusers_sde

        return diffusers_sde(rest)
    return None


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
