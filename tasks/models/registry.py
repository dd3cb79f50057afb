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
import math
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from pflatents.tasks.core import Model
from pflatents.tasks.errors import ModelError
from pflatents.tasks.models.scores import GaussianMixtureScore
from pflatents.tasks.ode.sde import SDE

__all__ = ["ModelKind", "MODEL_KINDS", "model_kind", "is_exact", "exact_kind", "absolute_model_spec", "ModelInfo", "resolve_model_spec", "model_info", "load_model", "resolve_device", "native_sde",
           "is_pickle_file", "files_stamp"]

PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".bin")


@dataclass(frozen=True)
class ModelInfo:
    """What the store pins about a model: its spec, kind, content hash and state dimension, and for a
    latent model (latent shape other than its data shape) the latent shape the store holds.
    ``data_dim`` (values per data sample, None: any) is checked against the data, not pinned."""

    spec: str
    kind: str
    content_hash: str
    dim: int | None
    latent_shape: tuple[int, ...] | None = None
    data_dim: int | None = None

    def to_dict(self) -> dict:
        d = {"spec": self.spec, "kind": self.kind, "content_hash": self.content_hash, "dim": self.dim}
        if self.latent_shape is not None:
            d["latent_shape"] = list(self.latent_shape)
        return d


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


# ---- the model kinds -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelKind:
    """One family of models, written ``name:REST`` in a model spec.

    - ``load(rest, sde)``: the ``pflatents.tasks.core.Model`` adapter (refuses an SDE it was not
      trained under).
    - ``resolve(rest)``: the rest of the spec normalised (absolute paths; ``_abs`` by default) after any
      check that needs no loading; pickles are refused before this runs.
    - ``native_sde(rest)``: the SDE the model was trained under, or None when it takes any.
    - ``files(rest)``: the files a load reads (their stats key the process cache, so an edited model
      is never served from it).
    - ``exact``: an exact (analytic) score: evaluated in the ODE state's dtype (no network precision,
      nothing to compile) and integrated with local error control by default.
    - ``training_data(rest)``: what the model records about its training data (a checkpoint's
      ``data`` record: spec, fingerprint, held-out split), or None when it records nothing.
    """

    name: str
    usage: str
    load: Callable[[str, SDE], Model]
    resolve: Callable[[str], str] = lambda rest: str(_abs(rest))
    native_sde: Callable[[str], Optional[SDE]] = lambda rest: None
    files: Callable[[str], list] = lambda rest: _tree(rest)
    exact: bool = False
    training_data: Callable[[str], Optional[dict]] = lambda rest: None


def _tree(rest: str) -> list:
    p = Path(rest)
    return sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else []


def _load_gmm(rest: str, sde: SDE) -> Model:
    return GaussianMixtureScore.from_json(rest, sde)


def _resolve_ckpt(rest: str) -> str:
    if not _abs(rest).is_dir():
        raise ModelError(f"checkpoint directory not found: {rest}")
    return str(_abs(rest))


def _load_ckpt(rest: str, sde: SDE) -> Model:
    from pflatents.tasks.models.checkpoint import load_checkpoint

    return load_checkpoint(rest, sde)


def _ckpt_sde(rest: str) -> SDE:
    from pflatents.tasks.models.checkpoint import checkpoint_sde

    return checkpoint_sde(rest)


def _ckpt_data(rest: str) -> Optional[dict]:
    from pflatents.tasks.models.checkpoint import read_config

    return read_config(rest).get("data") or {}


def _load_diffusers(rest: str, sde: SDE) -> Model:
    from pflatents.tasks.models.diffusers import load_diffusers

    return load_diffusers(rest, sde)


def _diffusers_sde(rest: str) -> SDE:
    from pflatents.tasks.models.diffusers import diffusers_sde

    return diffusers_sde(rest)


def _load_py(rest: str, sde: SDE) -> Model:
    from pflatents.tasks.models.usercode import load_user_model

    return load_user_model(rest, sde)


def _py_sde(rest: str) -> SDE:
    from pflatents.tasks.models.usercode import user_sde

    return user_sde(rest)


def _py_resolve(rest: str) -> str:
    from pflatents.tasks.models.usercode import resolve_user_spec

    return resolve_user_spec(rest)


def _py_files(rest: str) -> list:
    from pflatents.tasks.models.usercode import user_files

    return user_files(rest)


# prefix -> kind; a plain directory holding a checkpoint's config.json is ``ckpt``
MODEL_KINDS: dict[str, ModelKind] = {
    "gmm": ModelKind("gmm", "gmm:PATH.json", _load_gmm, files=lambda rest: [Path(rest)], exact=True),
    "ckpt": ModelKind("ckpt", "a checkpoint dir (or ckpt:DIR) written by `pflatents train`", _load_ckpt,
                      resolve=_resolve_ckpt, native_sde=_ckpt_sde, training_data=_ckpt_data),
    "diffusers": ModelKind("diffusers", "diffusers:DIR", _load_diffusers, native_sde=_diffusers_sde),
    "py": ModelKind("py", "py:module:callable or py:path/file.py:callable (runs that code)", _load_py,
                    resolve=_py_resolve, native_sde=_py_sde, files=_py_files),
}
KINDS = ", ".join(k.usage for k in MODEL_KINDS.values())


def model_kind(spec: str) -> tuple[ModelKind, str]:
    """The kind of a resolved spec (``kind:rest``) and its rest."""
    name, _, rest = spec.partition(":")
    if name not in MODEL_KINDS:
        raise ModelError(f"unknown model kind {name!r} in {spec!r}; supported: {KINDS}")
    return MODEL_KINDS[name], rest


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
    name, _, rest = spec.partition(":")
    _refuse_pickle(rest)
    kind, rest = model_kind(spec)
    return f"{kind.name}:{kind.resolve(rest)}"


def absolute_model_spec(spec: str) -> str:
    """The spec with its path made absolute (``kind:PATH`` or a checkpoint dir), without checking it
    (``resolve_model_spec`` checks), so a run started in another directory finds the model."""
    name, sep, rest = spec.partition(":")
    if sep and name in MODEL_KINDS and not Path(spec).expanduser().exists():
        return f"{name}:{_abs(rest)}"
    return str(_abs(spec)) if Path(spec).expanduser().exists() else spec


def files_stamp(files) -> tuple:
    """(name, mtime_ns, size) of each of ``files`` that exists: a process cache keyed by it never serves
    a model whose files were edited."""
    stamp = []
    for f in files:
        try:
            st = f.stat()
            stamp.append((str(f), st.st_mtime_ns, st.st_size))
        except OSError:
            pass
    return tuple(stamp)


def _file_stamp(spec: str) -> tuple:
    """The stamp of the files a model reads (``files_stamp``)."""
    kind, rest = model_kind(spec)
    return files_stamp(kind.files(rest))


@functools.lru_cache(maxsize=8)
def _load_cached(spec: str, sde: SDE, stamp: tuple) -> Model:
    kind, rest = model_kind(spec)
    return kind.load(rest, sde)


def _load(spec: str, sde: SDE) -> Model:
    return _load_cached(spec, sde, _file_stamp(spec))


def load_model(spec: str, sde: SDE, precision: str | None = None, compile: str = "off") -> Model:
    """The model for a spec (``pflatents.tasks.core.Model``); cached, so a worker process loads each
    model once.

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
def _configured(spec: str, sde: SDE, stamp: tuple, precision: str | None, compile: str) -> Model:
    """The cached model's adapter at ``precision`` / ``compile`` (shares the weights, nothing mutable)."""
    from pflatents.tasks.models.precision import check_compile, check_precision

    check_precision(precision)
    check_compile(compile)
    if model_kind(spec)[0].exact and precision in ("tf32", "bf16"):
        raise ModelError(f"--precision {precision} applies to networks; {spec} is an exact score "
                         "evaluated in the ODE state's dtype (use fp32 or fp64 with the matching --dtype)")
    return _load_cached(spec, sde, stamp).with_settings(precision, compile)


def native_sde(spec: str) -> SDE | None:
    """The SDE a model was trained under (checkpoints, diffusers); None when it takes any (gmm)."""
    kind, rest = model_kind(resolve_model_spec(spec))
    return kind.native_sde(rest)


def exact_kind(name: str) -> bool:
    """True when the model kind ``name`` is an exact (analytic) score (False for an unknown name)."""
    kind = MODEL_KINDS.get(name)
    return kind is not None and kind.exact


def is_exact(spec: str) -> bool:
    """True for an exact (analytic) score: no network, evaluated in the state's dtype."""
    return model_kind(resolve_model_spec(spec))[0].exact


def model_info(spec: str, sde: SDE) -> ModelInfo:
    """Load (cached) and describe a model for the store's pinned config."""
    spec = resolve_model_spec(spec)
    m = _load(spec, sde)
    latent = None if m.latent_shape == m.data_shape else tuple(m.latent_shape)
    data_dim = m.dim if latent is None else (math.prod(m.data_shape) if m.data_shape is not None else None)
    return ModelInfo(spec=spec, kind=model_kind(spec)[0].name, content_hash=m.content_hash, dim=m.dim,
                     latent_shape=latent, data_dim=data_dim)


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
