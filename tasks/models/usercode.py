"""``py:module:callable`` and ``py:path/file.py:callable``: your own ``torch.nn.Module`` as a PF-ODE model.

Giving a ``py:`` spec is the explicit choice to run that Python code (it is imported and the callable
called, with no arguments, in every process that loads the model); nothing else in pflatents runs
code from a model. Weights, when the declaration names a file, are read with safetensors only.

The callable returns ``(module, declaration)``: a ``torch.nn.Module`` called as ``module(x, label)``
(or ``module(x, label, cond)`` for a class-conditional model, ``cond`` an int64 tensor of one class
per row), and a dict declaring what it predicts and under which noise schedule (docs/models.md):

- ``parameterization``: ``eps`` (the noise), ``v`` (alpha eps - sigma x0), ``x0`` (the clean sample;
  an EDM denoiser under ``edm``), ``score`` (grad log p_t), ``velocity`` (dx/dt of the PF-ODE; for
  ``flow``: eps - x0);
- ``schedule``: ``{"kind": "vp", "beta_min", "beta_max"}``, ``{"kind": "ve", "sigma_min", "sigma_max"}``,
  ``{"kind": "edm", "sigma_max"}``, ``{"kind": "flow"}`` (x_t = (1 - t) x0 + t eps) or
  ``{"kind": "discrete", "alphas_cumprod": [...]}`` (a DDPM schedule of N steps); unset parameters
  take the ``--sde`` defaults;
- ``sample_shape``: the shape of one sample, e.g. ``[3, 32, 32]``;
- ``time_label`` (default ``t``): what the module gets as ``label``: ``t`` (the schedule's own time),
  ``sigma``, ``log_sigma`` or ``timestep`` (``discrete`` only: the index i = t N - 1, exact at the
  trained levels); multiplied by ``time_scale`` (default 1; 1000 for diffusers-style flow models);
- ``num_classes`` (optional): the model is class-conditional with classes 0 .. num_classes - 1;
- ``weights`` (optional): a ``.safetensors`` file (relative to the ``.py`` file, or absolute) loaded
  into the module with ``load_state_dict(strict=True)``.

``content_hash`` = sha256 of the source file, the declaration and every tensor of the module's state
(after the weights are loaded), so a resume refuses edited code or weights; a module whose weights
are random on every call (unseeded, no weights file) gets a new hash each time and cannot be resumed.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import json
import math
import sys
from pathlib import Path
from typing import Any, Optional

import torch

from pflatents.tasks.core import Cond, check_cond
from pflatents.tasks.errors import ModelError
from pflatents.tasks.models.adapters import DeviceNet, X0Score
from pflatents.tasks.models.flow import VelocityScore
from pflatents.tasks.models.scores import EpsScore, NetworkModel, VScore
from pflatents.tasks.ode.discrete import DiscreteVPSDE
from pflatents.tasks.ode.sde import SDE, make_sde

__all__ = ["load_user_model", "user_sde", "resolve_user_spec", "user_files", "ScoreNet", "PARAMETERIZATIONS",
           "TIME_LABELS"]

TIME_LABELS = ("t", "sigma", "log_sigma", "timestep")
KEYS = {"parameterization", "schedule", "sample_shape", "time_label", "time_scale", "num_classes", "weights"}
USAGE = "py:module:callable or py:path/file.py:callable"


class ScoreNet(NetworkModel):
    """A network that predicts the score grad_x log p_t itself: sigma^2 score = sigma^2 net."""

    def sigma2_score(self, x: torch.Tensor, t: torch.Tensor, cond: Cond = None) -> torch.Tensor:
        from pflatents.tasks.core import bcast

        return bcast(self.sde.sigma(t) ** 2, x) * self._predict(x, t, cond)


PARAMETERIZATIONS = {"eps": EpsScore, "v": VScore, "x0": X0Score, "score": ScoreNet, "velocity": VelocityScore}


def _split(rest: str) -> tuple[str, str]:
    target, sep, name = rest.rpartition(":")
    if not sep or not target or not name.isidentifier():
        raise ModelError(f"model spec py:{rest} must be {USAGE} (e.g. py:mymodels.nets:build or py:net.py:build)")
    return target, name


def _is_file(target: str) -> bool:
    return target.endswith(".py") or "/" in target or "\\" in target


def resolve_user_spec(rest: str) -> str:
    """``path/file.py:callable`` with an absolute path (the file must exist); a module path stays as given."""
    target, name = _split(rest)
    if _is_file(target):
        p = Path(target).expanduser().resolve()
        if not p.is_file():
            raise ModelError(f"model spec py:{rest}: no such Python file {p}")
        return f"{p}:{name}"
    return f"{target}:{name}"


def _source_file(target: str) -> Optional[Path]:
    if _is_file(target):
        return Path(target)
    spec = importlib.util.find_spec(target)
    return Path(spec.origin) if spec is not None and spec.origin and spec.origin.endswith(".py") else None


def user_files(rest: str) -> list[Path]:
    """The files a load reads (the source and, when declared, its weights): their stats key the cache."""
    target, _ = _split(rest)
    try:
        src = _source_file(target)
    except (ImportError, ValueError):
        return []
    files = [src] if src is not None else []
    if src is not None:
        files += sorted(src.parent.glob("*.safetensors"))
    return files


def _import(target: str, rest: str):
    if not _is_file(target):
        try:
            return importlib.import_module(target)
        except ImportError as e:
            raise ModelError(f"model spec py:{rest}: cannot import module {target!r}: {e} (is it on PYTHONPATH?)") from None
    path = Path(target)
    name = "pflatents_user_" + hashlib.sha256(str(path).encode()).hexdigest()[:16]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ModelError(f"model spec py:{rest}: cannot load {path} as Python")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    try:
        spec.loader.exec_module(mod)
    except Exception as e:  # noqa: BLE001 -- the user's code: report what it raised
        sys.modules.pop(name, None)
        raise ModelError(f"model spec py:{rest}: importing {path} raised {type(e).__name__}: {e}") from None
    return mod


def _schedule(decl: dict, rest: str) -> SDE:
    sched = decl["schedule"]
    if not isinstance(sched, dict) or "kind" not in sched:
        raise ModelError(f"model py:{rest}: 'schedule' must be a dict with a 'kind' (vp, ve, edm, flow, discrete); "
                         f"got {sched!r}")
    kind, params = sched["kind"], {k: v for k, v in sched.items() if k != "kind"}
    if kind == "discrete":
        if set(params) != {"alphas_cumprod"}:
            raise ModelError(f"model py:{rest}: a discrete schedule is {{'kind': 'discrete', 'alphas_cumprod': [...]}}")
        return DiscreteVPSDE(alphas_cumprod=tuple(float(a) for a in params["alphas_cumprod"]))
    try:
        return make_sde(kind, **params)
    except Exception as e:  # noqa: BLE001 -- SolverError for unknown names and bad parameters
        raise ModelError(f"model py:{rest}: bad schedule {sched!r}: {e}") from None


def _check_declaration(decl: Any, rest: str) -> dict:
    if not isinstance(decl, dict):
        raise ModelError(f"model py:{rest}: the callable must return (module, declaration dict); the declaration "
                         f"is a {type(decl).__name__}")
    unknown = sorted(set(decl) - KEYS)
    if unknown:
        raise ModelError(f"model py:{rest}: unknown declaration key(s) {', '.join(unknown)}; known: {', '.join(sorted(KEYS))}")
    missing = sorted({"parameterization", "schedule", "sample_shape"} - set(decl))
    if missing:
        raise ModelError(f"model py:{rest}: the declaration needs {', '.join(missing)} (docs/models.md)")
    if decl["parameterization"] not in PARAMETERIZATIONS:
        raise ModelError(f"model py:{rest}: parameterization {decl['parameterization']!r} is not one of "
                         f"{', '.join(PARAMETERIZATIONS)}")
    if decl.get("time_label", "t") not in TIME_LABELS:
        raise ModelError(f"model py:{rest}: time_label {decl['time_label']!r} is not one of {', '.join(TIME_LABELS)}")
    shape = decl["sample_shape"]
    if not (isinstance(shape, (list, tuple)) and shape and all(isinstance(d, int) and d > 0 for d in shape)):
        raise ModelError(f"model py:{rest}: sample_shape must be a list of positive ints; got {shape!r}")
    n = decl.get("num_classes")
    if n is not None and not (isinstance(n, int) and n >= 1):
        raise ModelError(f"model py:{rest}: num_classes must be a positive int; got {n!r}")
    return decl


@functools.lru_cache(maxsize=8)
def _build(rest: str, stamp: tuple):
    """(module, declaration, sde, source bytes): the user's callable run once per process and file state."""
    target, name = _split(rest)
    mod = _import(target, rest)
    fn = getattr(mod, name, None)
    if not callable(fn):
        raise ModelError(f"model spec py:{rest}: {target} has no callable {name!r}")
    try:
        out = fn()
    except Exception as e:  # noqa: BLE001 -- the user's code
        raise ModelError(f"model py:{rest}: {name}() raised {type(e).__name__}: {e}") from None
    if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[0], torch.nn.Module)):
        raise ModelError(f"model py:{rest}: {name}() must return (torch.nn.Module, declaration dict); got "
                         f"{type(out).__name__}")
    module, decl = out[0], _check_declaration(out[1], rest)
    sde = _schedule(decl, rest)
    if decl.get("time_label") == "timestep" and not isinstance(sde, DiscreteVPSDE):
        raise ModelError(f"model py:{rest}: time_label 'timestep' needs a discrete schedule")
    if decl.get("weights"):
        _load_weights(module, decl["weights"], target, rest)
    src = _source_file(target)
    return module, decl, sde, (src.read_bytes() if src is not None else b"")


def _load_weights(module: torch.nn.Module, weights: str, target: str, rest: str) -> None:
    from safetensors.torch import load_file

    from pflatents.tasks.models.registry import is_pickle_file

    p = Path(weights)
    if not p.is_absolute() and _is_file(target):
        p = Path(target).parent / p
    if p.suffix != ".safetensors" or is_pickle_file(p):
        raise ModelError(f"model py:{rest}: weights {p} must be a .safetensors file (pickles are refused: they can "
                         "execute code when loaded)")
    try:
        state = load_file(str(p))
    except (OSError, RuntimeError) as e:  # safetensors raises its own SafetensorError, a RuntimeError subclass? be broad
        raise ModelError(f"model py:{rest}: cannot read weights {p}: {e}") from None
    except Exception as e:  # noqa: BLE001
        raise ModelError(f"model py:{rest}: cannot read weights {p}: {e}") from None
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ModelError(f"model py:{rest}: weights {p} do not fit the module: {str(e).splitlines()[0]}") from None


def _stamp(rest: str) -> tuple:
    from pflatents.tasks.models.registry import files_stamp

    return files_stamp(user_files(rest))


def user_sde(rest: str) -> SDE:
    """The schedule the user's model declares (runs the user's callable, once per process)."""
    return _build(rest, _stamp(rest))[2]


def _time_fn(decl: dict, sde: SDE):
    kind, scale = decl.get("time_label", "t"), float(decl.get("time_scale", 1.0))
    if kind == "t":
        return (lambda t: t * scale) if scale != 1.0 else None
    if kind == "sigma":
        return lambda t: sde.sigma(t) * scale
    if kind == "log_sigma":
        return lambda t: torch.log(sde.sigma(t)) * scale
    return lambda t: sde.timestep(t) * scale


def _call(num_classes: Optional[int]):
    def call(module, x, label, cond: Cond = None):
        if num_classes is None:
            return module(x, label)
        check_cond(cond, num_classes, "this model")
        return module(x, label, cond)

    return call


def load_user_model(rest: str, sde: Optional[SDE] = None) -> NetworkModel:
    """The ``pflatents.tasks.core.Model`` of a ``py:`` spec (``rest`` as resolved)."""
    module, decl, native, src = _build(rest, _stamp(rest))
    if sde is not None and sde.to_dict() != native.to_dict():
        raise ModelError(f"model py:{rest} declares the {native.name} schedule {native.to_dict()}; it runs under that "
                         f"SDE, not {sde.to_dict()}")
    n = decl.get("num_classes")
    model = PARAMETERIZATIONS[decl["parameterization"]](DeviceNet(module, _call(n)), native, time_fn=_time_fn(decl, native))
    model.sample_shape = tuple(decl["sample_shape"])
    model.dim = math.prod(model.sample_shape)
    model.conditional = n is not None
    model.num_classes = n
    model.prediction_type = decl["parameterization"]
    h = hashlib.sha256(src)
    h.update(json.dumps(decl, sort_keys=True, default=str).encode())
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(str(tuple(v.shape)).encode() + str(v.dtype).encode())
        h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    model.content_hash = h.hexdigest()
    return model
