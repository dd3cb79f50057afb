"""More network adapters (besides ``pflatents.tasks.models.scores``): data prediction, and device/dtype placement.

- ``X0Score``: a network that predicts the clean sample x0 (diffusers ``prediction_type="sample"``):
  ``sigma^2 score = alpha x0_hat - x`` (Tweedie), ``score = (alpha x0_hat - x) / sigma^2``.
- ``DeviceNet``: runs a module on whatever device the state lives on (one copy per device and dtype,
  made on first use) at a network precision (fp32 | tf32 | bf16 | fp64, or the module's own dtype),
  optionally compiled, casting inputs and outputs at the boundary.
"""

from __future__ import annotations

import copy
import threading
import warnings
from typing import Callable

import torch

from pflatents.tasks.models import precision as P
from pflatents.tasks.core import Cond, bcast as _bcast
from pflatents.tasks.models.scores import EpsScore

__all__ = ["X0Score", "DeviceNet"]


class X0Score(EpsScore):
    """Sample (x0) prediction: score = (alpha x0_hat - x) / sigma^2."""

    def x0(self, x: torch.Tensor, t: torch.Tensor, cond: Cond = None) -> torch.Tensor:
        """The network's clean-sample prediction."""
        return self._predict(x, t, cond)

    def eps(self, x: torch.Tensor, t: torch.Tensor, cond: Cond = None) -> torch.Tensor:
        """eps = (x - alpha x0_hat) / sigma."""
        return (x - _bcast(self.sde.alpha(t), x) * self.x0(x, t, cond)) / _bcast(self.sde.sigma(t), x)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: Cond = None) -> torch.Tensor:
        return self.sigma2_score(x, t, cond) / _bcast(self.sde.sigma(t) ** 2, x)

    def sigma2_score(self, x: torch.Tensor, t: torch.Tensor, cond: Cond = None) -> torch.Tensor:
        """alpha x0_hat - x, with no division by sigma."""
        return _bcast(self.sde.alpha(t), x) * self.x0(x, t, cond) - x


class DeviceNet:
    """Call ``fn(module, x, label[, cond])`` with the module on x's device at a network precision; the output
    takes x's dtype.

    ``precision`` (``pflatents.tasks.models.precision``): None keeps the module's own dtype (TF32 still
    off on a GPU); fp32 / tf32 / bf16 / fp64 as documented there. ``compile``: auto | on | off. One
    copy of the module per (device, dtype) is made on first use (the given module is never changed);
    a compile that fails falls back to the eager module with a warning that says why.
    """

    def __init__(self, module: torch.nn.Module,
                 fn: Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                 precision: str | None = None, compile: str = "off") -> None:
        module.eval().requires_grad_(False)
        self.module = module
        self.fn = fn or (lambda m, *args: m(*args))
        self.precision = P.check_precision(precision)
        self.compile = P.check_compile(compile)
        self.dtype = P.compute_dtype(precision, next(module.parameters()).dtype)
        # a module that computes its time embedding's phase in float64 takes the label unrounded
        self.label_dtype = torch.float64 if getattr(module, "takes_float64_label", False) else self.dtype
        self._copies: dict[tuple, torch.nn.Module] = {}
        if next(module.parameters()).dtype == self.dtype and next(module.parameters()).device.type == "cpu":
            self._copies[(torch.device("cpu"), self.dtype)] = module
        self._compiled: dict[torch.device, Callable | None] = {}
        self.compile_status: dict[str, str] = {}  # device -> "compiled" | "eager" | "failed: ..."
        self._lock = threading.Lock()

    def compile_state(self, device) -> str | None:
        """"compiled", "eager" or "failed: why" on ``device`` once the network has run there, else None."""
        return self.compile_status.get(str(_full(device)))

    def with_settings(self, precision: str | None, compile: str = "off") -> "DeviceNet":
        """The same module and call at another precision / compile mode (shares nothing mutable)."""
        return DeviceNet(self.module, self.fn, precision, compile)

    def on(self, device: torch.device) -> torch.nn.Module:
        """The module's copy on ``device`` in the compute dtype (made once)."""
        device = _full(device)
        key = (device, self.dtype)
        with self._lock:
            if key not in self._copies:
                self._copies[key] = copy.deepcopy(self.module).to(device=device, dtype=self.dtype)
            return self._copies[key]

    def _runner(self, device: torch.device) -> Callable:
        """What to call on ``device``: the compiled module when compiling, else the plain copy."""
        m = self.on(device)
        if not P.use_compile(self.compile, device):
            self.compile_status[str(device)] = "eager"
            return m
        with self._lock:
            if device not in self._compiled:
                if device.type == "cuda" and _is_conv(m):
                    m = m.to(memory_format=torch.channels_last)
                try:
                    self._compiled[device] = torch.compile(m)
                    self.compile_status[str(device)] = "compiled"
                except Exception as e:  # noqa: BLE001 -- any compile failure falls back to eager
                    self._fail(device, e)
            compiled = self._compiled[device]
            return m if compiled is None else compiled  # (a compiled module has no truth value)

    def _fail(self, device: torch.device, e: BaseException) -> None:
        msg = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        warnings.warn(f"torch.compile of the network failed on {device} ({msg}); running it uncompiled "
                      "(pass --compile off to skip the attempt)", RuntimeWarning, stacklevel=3)
        self._compiled[device] = None
        self.compile_status[str(device)] = f"failed: {msg}"

    def __call__(self, x: torch.Tensor, label: torch.Tensor, cond: Cond = None) -> torch.Tensor:
        dev = _full(x.device)
        run = self._runner(dev)
        xin, lab = x.to(self.dtype), label.to(self.label_dtype)
        if self._compiled.get(dev) is not None and dev.type == "cuda" and xin.ndim == 4:
            xin = xin.contiguous(memory_format=torch.channels_last)
        extra = () if cond is None else (cond.to(dev),)
        with P.matmul_flags(self.precision, dev), P.autocast(self.precision, dev):
            if run is self._compiled.get(dev):
                try:
                    out = self.fn(run, xin, lab, *extra)
                except Exception as e:  # noqa: BLE001 -- compile errors surface at the first call
                    with self._lock:
                        self._fail(dev, e)
                    out = self.fn(self.on(dev), xin, lab, *extra)
            else:
                out = self.fn(run, xin, lab, *extra)
        return out.to(x.dtype).contiguous()


def _full(device) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _is_conv(m: torch.nn.Module) -> bool:
    return any(isinstance(c, torch.nn.Conv2d) for c in m.modules())
