"""The contracts every part of ``pflatents.tasks`` shares, in one small module with no project imports
besides the errors: what a source hands out (``Batch``), what a model is (``Model``), and the helpers
both the ODE core (``tasks/ode``) and the model adapters (``tasks/models``) use. ``tasks/ode`` imports
this module, never ``tasks/models``; ``tasks/models`` may import ``tasks/ode`` (the SDEs), so the two
packages no longer import each other (tests/test_layering.py).

The diagram and the how-tos: docs/architecture.md ("Contracts"), docs/extending.md.

Conditioning: a network is called ``model(x, t, cond)`` where ``cond`` is ``None`` or a
``torch.LongTensor`` of shape ``(batch,)`` holding one class label per row of ``x``. Whoever hands the
network a subset of the rows (device batches, the adaptive solver's still-active rows, a retry of
flagged samples) hands it the same subset of ``cond``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Protocol, runtime_checkable

import numpy as np
import torch

from pflatents.tasks.errors import DataError

__all__ = ["Batch", "Cond", "Model", "ModelBase", "ScoreFunction", "as_model", "bcast", "check_cond", "cond_tensor",
           "take_cond"]

Cond = Optional[torch.Tensor]  # None or int64 (batch,): one class label per row


def bcast(c: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Cast a float64 per-sample coefficient (B,) or scalar to x's dtype/device, broadcastable to x."""
    c = c.to(device=x.device, dtype=x.dtype)
    if c.ndim == 1:
        c = c.reshape(-1, *([1] * (x.ndim - 1)))
    return c


@dataclass(frozen=True)
class Batch:
    """Rows ``[start, stop)`` of a source: the samples ``x`` (n, *sample_shape), and per row an optional
    id (``ids``, strings, e.g. a file name or a tar key) and an optional class label (``labels``, int64).

    ``ids`` and ``labels`` are None when the source has none; when given they have one entry per row.
    """

    x: np.ndarray
    ids: Optional[np.ndarray] = None
    labels: Optional[np.ndarray] = None

    def __post_init__(self) -> None:
        n = len(self.x)
        if self.ids is not None:
            if self.ids.ndim != 1 or len(self.ids) != n:
                raise DataError(f"a batch of {n} samples needs {n} ids; got shape {tuple(self.ids.shape)}")
            if self.ids.dtype.kind not in "UO":
                raise DataError(f"sample ids must be strings; got dtype {self.ids.dtype}")
        if self.labels is not None:
            if self.labels.ndim != 1 or len(self.labels) != n:
                raise DataError(f"a batch of {n} samples needs {n} labels; got shape {tuple(self.labels.shape)}")
            if self.labels.dtype != np.int64:
                raise DataError(f"class labels must be int64; got dtype {self.labels.dtype}")

    def __len__(self) -> int:
        return len(self.x)

    def rows(self, start: int, stop: int) -> "Batch":
        """The batch of rows ``[start, stop)`` of this one (ids and labels follow their rows)."""
        return Batch(self.x[start:stop], None if self.ids is None else self.ids[start:stop],
                     None if self.labels is None else self.labels[start:stop])


def cond_tensor(labels: Optional[np.ndarray], device: torch.device | str = "cpu") -> Cond:
    """The network's ``cond`` for a block's labels: None, or an int64 tensor on ``device``."""
    if labels is None:
        return None
    return torch.as_tensor(np.asarray(labels, dtype=np.int64), device=device)


def check_cond(cond: Cond, num_classes: int, what: str) -> None:
    """A class-conditional network's labels, checked before it is called: present, and each one of its
    ``num_classes`` classes. ``what`` names the network in the message (e.g. "this UNet2DModel")."""
    if cond is None:
        raise DataError(f"{what} is class-conditional ({num_classes} classes) and was called without labels: "
                        "give data with labels, or --class-label K for all samples")
    out = (cond < 0) | (cond >= num_classes)
    if bool(out.any()):
        raise DataError(f"class label {int(cond[out][0])} is out of range for {what} with {num_classes} classes "
                        f"(0..{num_classes - 1})")


def take_cond(cond: Cond, rows: torch.Tensor | slice) -> Cond:
    """``cond`` restricted to ``rows`` (an index tensor, a mask or a slice), None stays None."""
    if cond is None:
        return None
    if isinstance(rows, torch.Tensor):
        rows = rows.to(cond.device)
    return cond[rows]


@runtime_checkable
class Model(Protocol):
    """A diffusion model as the PF-ODE sees it: one form, the scaled score, with a conditioning slot.

    - ``velocity(x, t, cond)``: the PF-ODE's right-hand side ``dx/dt`` in the SDE's own time, what the
      solver integrates in t. ``ModelBase`` derives it from the scaled score and the SDE's drift,
      ``f(t) x - g(t)^2 / (2 sigma^2) * sigma2_score``; a velocity network (flow matching) overrides it
      with its prediction, which stays finite at alpha = 0 (t = 1), where ``f`` and ``g^2`` do not.
    - ``sigma2_score(x, t, cond)``: ``sigma(t)^2 * grad_x log p_t(x | cond)`` for a state ``x`` of shape
      ``(B, *latent_shape)`` in the caller's dtype and per-sample times ``t`` (float64, shape (B,)),
      in the SDE's own time (``sde``: ``x_t = alpha(t) x_0 + sigma(t) eps``, t in [0, T]). This form is
      the denoiser's in disguise (``alpha D - x``, Tweedie) and stays finite where sigma -> 0 and
      where alpha -> 0 (flow matching's t = 1): nothing in the contract divides by sigma or alpha or
      uses ``s = log(sigma/alpha)``. ``cond`` is None or int64 (B,) labels aligned with x's rows.
    - ``content_hash``: a string that changes whenever the model's weights or parameters change
      (pinned in the store; a resume refuses a different one).
    - ``data_shape``: the shape of one data sample the model accepts, or None when any shape of the
      right size does (an exact GMM score checks the number of values only: ``dim``).
    - ``latent_shape``: the shape of the ODE state (the stored latent); equal to ``data_shape`` except
      for latent models, whose ``encode_data`` / ``decode_data`` map between data and latent space.
    - ``dim``: values per sample of the ODE state (``prod(latent_shape)``), or None if the model
      takes any.
    - ``conditional``: whether the network uses ``cond`` (a conditional model needs labels);
      ``num_classes``: its labels are ``0 .. num_classes - 1`` (None: not conditional, or not known).
    - ``encode_data(x)`` / ``decode_data(z)``: the encoder/decoder pair (identity for pixel models).
    - ``with_settings(precision, compile)``: the same model at a network precision / compile mode
      (``pflatents.tasks.models.precision``); ``network_status(device)``: how the network ran there
      (precision, compiled or eager), recorded per shard.
    """

    content_hash: str
    dim: Optional[int]
    conditional: bool
    num_classes: Optional[int]

    def sigma2_score(self, x: torch.Tensor, t: torch.Tensor, cond: Cond = None) -> torch.Tensor: ...

    def velocity(self, x: torch.Tensor, t: torch.Tensor, cond: Cond = None) -> torch.Tensor: ...

    @property
    def data_shape(self) -> Optional[tuple[int, ...]]: ...

    @property
    def latent_shape(self) -> Optional[tuple[int, ...]]: ...

    def encode_data(self, x: torch.Tensor) -> torch.Tensor: ...

    def decode_data(self, z: torch.Tensor) -> torch.Tensor: ...

    def with_settings(self, precision: Optional[str], compile: str = "off") -> "Model": ...

    def network_status(self, device) -> dict: ...


class ModelBase:
    """Defaults of the ``Model`` contract for a pixel-space adapter: the data and latent shapes are
    ``sample_shape`` (None: any shape of ``dim`` values), the encoder and decoder are the identity, no
    conditioning, nothing to configure; the velocity follows from the scaled score. Calling the adapter
    gives the score. Subclasses define ``sigma2_score`` (and ``velocity`` when they predict it) and set
    ``sde``."""

    content_hash: str = ""
    dim: Optional[int] = None
    sample_shape: Optional[tuple[int, ...]] = None
    conditional: bool = False
    num_classes: Optional[int] = None
    sde: Any

    @property
    def data_shape(self) -> Optional[tuple[int, ...]]:
        return self.sample_shape

    @property
    def latent_shape(self) -> Optional[tuple[int, ...]]:
        return self.sample_shape

    def encode_data(self, x: torch.Tensor) -> torch.Tensor:
        """Data -> ODE state (identity: the model works in data space)."""
        return x

    def decode_data(self, z: torch.Tensor) -> torch.Tensor:
        """ODE state -> data (identity)."""
        return z

    def with_settings(self, precision: Optional[str], compile: str = "off") -> "ModelBase":
        """This model evaluated at a network precision / compile mode (an exact score: itself)."""
        return self

    def network_status(self, device) -> dict:
        """How the network ran on ``device`` (recorded per shard): its precision and compile state."""
        return {"precision": None, "compile": None}

    def sigma2_score(self, x: torch.Tensor, t: torch.Tensor, cond: Cond = None) -> torch.Tensor:
        raise NotImplementedError

    def velocity(self, x: torch.Tensor, t: torch.Tensor, cond: Cond = None) -> torch.Tensor:
        """dx/dt = f(t) x - g(t)^2 / (2 sigma(t)^2) * sigma^2 score: the PF-ODE (Song et al. 2021, eq. 13)
        in the SDE's own time, from the scaled score (infinite where alpha = 0: a flow model overrides it)."""
        sde = self.sde
        sig2 = sde.sigma(t) ** 2
        s2score = self.sigma2_score(x, t, cond)
        return bcast(sde.f(t), x) * x - bcast(0.5 * sde.g2(t) / sig2, x) * s2score

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: Cond = None) -> torch.Tensor:
        """The score grad_x log p_t(x | cond)."""
        return self.sigma2_score(x, t, cond) / bcast(self.sde.sigma(t) ** 2, x)


class ScoreFunction(ModelBase):
    """A plain score function ``score(x, t)`` (a test oracle, a wrapper that counts calls) as a ``Model``
    under ``sde``: ``sigma2_score = sigma(t)^2 score(x, t)``; unconditional, data space, no hash."""

    def __init__(self, score, sde) -> None:
        self.score, self.sde = score, sde

    def sigma2_score(self, x: torch.Tensor, t: torch.Tensor, cond: Cond = None) -> torch.Tensor:
        return bcast(self.sde.sigma(t) ** 2, x) * self.score(x, t)


def as_model(model, sde) -> Model:
    """``model`` itself when it implements ``Model``, else a plain score function wrapped by ``ScoreFunction``."""
    return model if isinstance(model, Model) else ScoreFunction(model, sde)
