"""More network adapters (besides ``pflatents.tasks.models.scores``): data prediction, and device/dtype placement.

- ``X0Score``: a network that predicts the clean sample x0 (diffusers ``prediction_type="sample"``):
  ``sigma^2 score = alpha x0_hat - x`` (Tweedie), ``score = (alpha x0_hat - x) / sigma^2``.
- ``DeviceNet``: runs a module on whatever device the state lives on (one copy per device, made on
  first use), in the module's own dtype, casting inputs and outputs at the boundary.
"""

from __future__ import annotations

import copy
import threading
from typing import Callable

import torch

from pflatents.tasks.models.scores import EpsScore
from pflatents.tasks.ode.sde import _bcast

__all__ = ["X0Score", "DeviceNet"]


class X0Score(EpsScore):
    """Sample (x0) prediction: score = (alpha x0_hat - x) / sigma^2."""

    def x0(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The network's clean-sample prediction."""
        return self.net(x, self._label(t, x))

    def eps(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """eps = (x - alpha x0_hat) / sigma."""
        return (x - _bcast(self.sde.alpha(t), x) * self.x0(x, t)) / _bcast(self.sde.sigma(t), x)

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.sigma2_score(x, t) / _bcast(self.sde.sigma(t) ** 2, x)

    def sigma2_score(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """alpha x0_hat - x, with no division by sigma."""
        return _bcast(self.sde.alpha(t), x) * self.x0(x, t) - x


class DeviceNet:
    """Call ``fn(module, x, label)`` with the module on x's device; the output takes x's dtype."""

    def __init__(self, module: torch.nn.Module,
                 fn: Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> None:
        module.eval().requires_grad_(False)
        self.module = module
        self.fn = fn or (lambda m, x, lab: m(x, lab))
        self.dtype = next(module.parameters()).dtype
        self._copies: dict[torch.device, torch.nn.Module] = {torch.device("cpu"): module}
        self._lock = threading.Lock()

    def on(self, device: torch.device) -> torch.nn.Module:
        """The module's copy on ``device`` (made once)."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        with self._lock:
            if device not in self._copies:
                self._copies[device] = copy.deepcopy(self.module).to(device)
            return self._copies[device]

    def __call__(self, x: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        m = self.on(x.device)
        return self.fn(m, x.to(self.dtype), label.to(self.dtype)).to(x.dtype)
