"""Model adapters behind one contract (``pflatents.tasks.core.Model``): ``sigma2_score(x, t, cond)``
= sigma(t)^2 grad_x log p_t(x | cond), per-sample ``t``; calling an adapter gives the score itself.

- ``ModelBase`` (from ``pflatents.tasks.core``): the contract's defaults for a pixel-space model.
- ``GaussianMixtureScore``: the exact score of a diffused Gaussian mixture (test oracle and the
  ``gmm:params.json`` model).
- Adapters that turn a network into a score: noise prediction (``EpsScore``), v-prediction
  (``VScore``) and an EDM/k-diffusion denoiser ``D(x, sigma)`` (``DenoiserScore``).

``t`` is a float64 tensor of shape (B,); ``x`` has shape (B, ...) in the caller's dtype.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from pathlib import Path
from typing import Callable, Optional

import torch

from pflatents.tasks.core import Cond, Model, ModelBase, bcast as _bcast
from pflatents.tasks.errors import DataError, ModelError
from pflatents.tasks.ode.sde import SDE

__all__ = ["ScoreModel", "ModelBase", "GaussianMixtureScore", "EpsScore", "VScore", "DenoiserScore", "load_gmm"]

F64 = torch.float64
ScoreModel = Model  # the earlier name of the contract


class GaussianMixtureScore(ModelBase):
    """Exact score of sum_k w_k N(alpha mu_k, alpha^2 C_k + sigma^2 I) (docs/math.md).

    Each covariance is diagonalised once, C_k = U_k diag(lam_k) U_k^T, so the diffused covariance
    S_k = U_k diag(alpha^2 lam_k + sigma^2) U_k^T is inverted exactly for every sample's own t at
    O(K D^2) per sample: this is the Cholesky solve of S_k done in the eigenbasis, which a
    per-sample t makes cheaper than one factorisation per (sample, component).
    """

    def __init__(self, weights, means, covariances, sde: SDE, source: str = "<memory>") -> None:
        w, mu, cov = _validate_gmm(weights, means, covariances, source)
        self.sde = sde
        self.dim = mu.shape[1]
        self.n_components = mu.shape[0]
        self.log_w = torch.log(w)
        self.mu = mu
        lam, U = torch.linalg.eigh(cov)
        self.lam, self.U = lam, U
        self.Ut_mu = torch.einsum("kji,kj->ki", U, mu)  # mean in each component's eigenbasis
        self._cache: dict[tuple, tuple[torch.Tensor, ...]] = {}
        self.content_hash = _hash_params(w, mu, cov)

    @classmethod
    def from_json(cls, path: str | Path, sde: SDE) -> "GaussianMixtureScore":
        """Read ``{"weights": [K], "means": [K][D], "covariances": [K][D][D]}``."""
        p = Path(path)
        try:
            doc = json.loads(p.read_text())
        except FileNotFoundError:
            raise ModelError(f"model file not found: {p}") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ModelError(f"cannot read model file {p}: {e}") from None
        except json.JSONDecodeError as e:
            raise ModelError(f"malformed JSON in model file {p}: {e.msg} at line {e.lineno} column {e.colno}") from None
        if not isinstance(doc, dict) or not {"weights", "means", "covariances"} <= set(doc):
            raise ModelError(f"model file {p} must be a JSON object with keys 'weights', 'means', 'covariances'")
        return cls(doc["weights"], doc["means"], doc["covariances"], sde, source=str(p))

    def to_json(self) -> dict:
        """The parameters as the JSON document ``from_json`` reads."""
        cov = self.U @ torch.diag_embed(self.lam) @ self.U.transpose(1, 2)
        return {"weights": self.log_w.exp().tolist(), "means": self.mu.tolist(), "covariances": cov.tolist()}

    def _params(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        key = (device, dtype)
        if key not in self._cache:
            self._cache[key] = tuple(a.to(device=device, dtype=dtype) for a in (self.log_w, self.lam, self.U, self.Ut_mu))
        return self._cache[key]

    def _parts(self, x: torch.Tensor, t: torch.Tensor):
        """Eigenbasis residuals y (B,K,D), variances v (B,K,D) and log N_k (B,K)."""
        self.check_dim(x)
        t = torch.as_tensor(t, dtype=F64, device=x.device).expand(x.shape[0])
        log_w, lam, U, Ut_mu = self._params(x.device, x.dtype)
        a = self.sde.alpha(t).to(x.dtype)
        s2 = (self.sde.sigma(t) ** 2).to(x.dtype)
        xf = x.reshape(x.shape[0], -1)
        y = torch.einsum("bi,kij->bkj", xf, U) - a[:, None, None] * Ut_mu[None]
        v = a[:, None, None] ** 2 * lam[None] + s2[:, None, None]
        logn = -0.5 * ((y * y) / v).sum(-1) - 0.5 * torch.log(v).sum(-1) - 0.5 * self.dim * math.log(2 * math.pi)
        return y, v, log_w[None] + logn

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: Cond = None) -> torch.Tensor:
        """score = -sum_k r_k S_k^{-1} (x - alpha mu_k), r = softmax_k(log w_k + log N_k)."""
        y, v, logits = self._parts(x, t)
        r = torch.softmax(logits, dim=1)
        g = torch.einsum("bk,bkj,kij->bi", r, y / v, self._params(x.device, x.dtype)[2])
        return (-g).reshape(x.shape)

    def sigma2_score(self, x: torch.Tensor, t: torch.Tensor, cond: Cond = None) -> torch.Tensor:
        """sigma(t)^2 times the exact score (the mixture takes no conditioning)."""
        return _bcast(self.sde.sigma(t) ** 2, x) * self(x, t)

    def log_prob(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """log p_t(x) per sample (B,)."""
        return torch.logsumexp(self._parts(x, t)[2], dim=1)

    def check_dim(self, x: torch.Tensor) -> None:
        """Raise DataError if the samples' size does not match the mixture's dimension."""
        d = x[0].numel() if x.ndim > 1 else 0
        if x.ndim < 2 or d != self.dim:
            raise DataError(f"sample shape {tuple(x.shape[1:])} ({d} values) does not match the model's dimension D = {self.dim}")


def _validate_gmm(weights, means, covariances, source: str):
    """Convert to float64 tensors and check shapes, weights and SPD covariances."""
    try:
        w = torch.as_tensor(weights, dtype=F64)
        mu = torch.as_tensor(means, dtype=F64)
        cov = torch.as_tensor(covariances, dtype=F64)
    except (TypeError, ValueError, RuntimeError) as e:
        raise ModelError(f"{source}: weights/means/covariances must be numeric arrays [K], [K][D], [K][D][D]: {e}") from None
    if w.ndim != 1 or w.numel() == 0:
        raise ModelError(f"{source}: 'weights' must be a non-empty list [K]; got shape {tuple(w.shape)}")
    k = w.numel()
    if mu.ndim != 2 or mu.shape[0] != k:
        raise ModelError(f"{source}: 'means' must have shape [K={k}][D]; got {tuple(mu.shape)}")
    d = mu.shape[1]
    if cov.shape != (k, d, d):
        raise ModelError(f"{source}: 'covariances' must have shape [K={k}][D={d}][D={d}]; got {tuple(cov.shape)}")
    for name, a in (("weights", w), ("means", mu), ("covariances", cov)):
        if not torch.isfinite(a).all():
            raise ModelError(f"{source}: '{name}' contains NaN or Inf")
    if (w < 0).any():
        i = int(torch.nonzero(w < 0)[0])
        raise ModelError(f"{source}: weights must be non-negative; weights[{i}] = {w[i].item():g}")
    if abs(w.sum().item() - 1.0) > 1e-6:
        raise ModelError(f"{source}: weights must sum to 1; they sum to {w.sum().item():.9g}")
    for i in range(k):
        if not torch.allclose(cov[i], cov[i].T, rtol=1e-10, atol=1e-12):
            raise ModelError(f"{source}: covariances[{i}] is not symmetric")
        _, info = torch.linalg.cholesky_ex(cov[i])
        if info != 0:
            lmin = torch.linalg.eigvalsh(cov[i])[0].item()
            raise ModelError(f"{source}: covariances[{i}] is not symmetric positive definite (smallest eigenvalue {lmin:.3g})")
    return w, mu, cov


def _hash_params(*arrays: torch.Tensor) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(str(tuple(a.shape)).encode())
        h.update(a.contiguous().numpy().tobytes())
    return h.hexdigest()


def load_gmm(path: str | Path, sde: SDE) -> GaussianMixtureScore:
    """Load a ``gmm:params.json`` model."""
    return GaussianMixtureScore.from_json(path, sde)


# ---- network adapters -----------------------------------------------------------------------------

Net = Callable[..., torch.Tensor]  # net(x, label) or net(x, label, cond)


class NetworkModel(ModelBase):
    """A network ``net(x, label[, cond])`` with a time label ``time_fn(t)`` (t itself by default);
    subclasses say what it predicts. ``with_settings`` rebuilds the network's device wrapper at another
    precision / compile mode (the weights are shared)."""

    def __init__(self, net: Net, sde: SDE, time_fn: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        self.net, self.sde, self.time_fn = net, sde, time_fn

    def with_settings(self, precision: Optional[str], compile: str = "off") -> "NetworkModel":
        model = copy.copy(self)
        model.net = self.net.with_settings(precision, compile)
        return model

    def network_status(self, device) -> dict:
        net = self.net
        state = net.compile_state(device) if hasattr(net, "compile_state") else None
        return {"precision": getattr(net, "precision", None), "compile": state}

    def _label(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The time label on x's device, in the net's ``label_dtype`` if it declares one, else x's dtype."""
        lab = self.time_fn(t) if self.time_fn is not None else t
        return lab.to(device=x.device, dtype=getattr(self.net, "label_dtype", None) or x.dtype)

    def _predict(self, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        """The network's raw prediction (conditioned when ``cond`` is given)."""
        lab = self._label(t, x)
        return self.net(x, lab) if cond is None else self.net(x, lab, cond)


class EpsScore(NetworkModel):
    """Noise prediction eps(x, t): score = -eps / sigma(t) (DDPM / score_sde convention)."""

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: Cond = None) -> torch.Tensor:
        return -self.eps(x, t, cond) / _bcast(self.sde.sigma(t), x)

    def eps(self, x: torch.Tensor, t: torch.Tensor, cond: Cond = None) -> torch.Tensor:
        """The network's noise prediction."""
        return self._predict(x, t, cond)

    def sigma2_score(self, x: torch.Tensor, t: torch.Tensor, cond: Cond = None) -> torch.Tensor:
        """sigma^2 score = -sigma eps, without dividing by a tiny sigma first."""
        return -self.eps(x, t, cond) * _bcast(self.sde.sigma(t), x)


class VScore(EpsScore):
    """v-prediction v = alpha eps - sigma x0 (Salimans & Ho 2022): eps = (sigma x + alpha v)/(alpha^2 + sigma^2)."""

    def eps(self, x: torch.Tensor, t: torch.Tensor, cond: Cond = None) -> torch.Tensor:
        """Noise prediction recovered from the network's v."""
        v = self._predict(x, t, cond)
        a, s = _bcast(self.sde.alpha(t), x), _bcast(self.sde.sigma(t), x)
        return (s * x + a * v) / (a * a + s * s)


class DenoiserScore(ModelBase):
    """EDM/k-diffusion denoiser D(x_hat, sigma_hat[, cond]) on x_hat = x/alpha, sigma_hat = sigma/alpha.

    score_x = (alpha D(x/alpha, sigma/alpha) - x) / sigma^2 (Tweedie; Karras et al. 2022 eq. 3).
    """

    def __init__(self, denoiser: Net, sde: SDE) -> None:
        self.denoiser, self.sde = denoiser, sde

    def sigma2_score(self, x: torch.Tensor, t: torch.Tensor, cond: Cond = None) -> torch.Tensor:
        """sigma^2 score = alpha D(x/alpha, sigma/alpha) - x, free of the 1/sigma^2 cancellation."""
        a = _bcast(self.sde.alpha(t), x)
        sig_hat = (self.sde.sigma(t) / self.sde.alpha(t)).to(device=x.device, dtype=x.dtype)
        d = self.denoiser(x / a, sig_hat) if cond is None else self.denoiser(x / a, sig_hat, cond)
        return a * d - x
