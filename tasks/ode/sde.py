"""Forward SDEs and their probability-flow ODEs (Song et al. 2021; Karras et al. 2022).

Every SDE here is written as x_t = alpha(t) x_0 + sigma(t) eps. Its PF-ODE is
``dx/dt = f(t) x - 1/2 g(t)^2 score_t(x)`` with ``f = dlog(alpha)/dt`` and
``g^2 = d(sigma^2)/dt - 2 f sigma^2``. The second time variable is the log noise-to-signal time
``s = log(sigma/alpha)`` (= -lambda, the negative half log-SNR), where the ODE reads
``dx/ds = dlog(alpha)/ds * x - sigma^2 score``. Fixed-step solvers step on grids in s; dopri5 steps
in t by default (in s for a discrete schedule: ``preferred_time_var``, ``SolverConfig.time_var``).
Conventions: docs/math.md.

Schedule quantities are computed in float64 whatever the state's dtype.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from pflatents.tasks.core import bcast
from pflatents.tasks.errors import SolverError

__all__ = ["SDE", "VPSDE", "VESDE", "EDMSDE", "FlowSDE", "make_sde", "SDE_NAMES"]

F64 = torch.float64


def _t64(t: torch.Tensor | float) -> torch.Tensor:
    return torch.as_tensor(t, dtype=F64)


class SDE:
    """Base: subclasses define log_alpha(t), sigma(t), s(t) <-> t(s) and dlog_alpha/ds."""

    name: str = "base"
    T: float = 1.0
    preferred_time_var = "t"  # the adaptive solver's time variable under SolverConfig(time_var="auto")

    # -- schedule (float64) --------------------------------------------------------------------
    def log_alpha(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        """alpha(t), float64."""
        return torch.exp(self.log_alpha(_t64(t)))

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def s_of_t(self, t: torch.Tensor) -> torch.Tensor:
        """s = log(sigma / alpha), increasing in t."""
        raise NotImplementedError

    def t_of_s(self, s: torch.Tensor) -> torch.Tensor:
        """Inverse of s_of_t."""
        raise NotImplementedError

    def dlog_alpha_ds(self, t: torch.Tensor) -> torch.Tensor:
        """d log(alpha) / ds, the linear coefficient of the PF-ODE in s-time."""
        raise NotImplementedError

    def f(self, t: torch.Tensor) -> torch.Tensor:
        """Drift coefficient f(t) = dlog(alpha)/dt (drift is f(t) x)."""
        raise NotImplementedError

    def g2(self, t: torch.Tensor) -> torch.Tensor:
        """Squared diffusion g(t)^2 = d(sigma^2)/dt - 2 f sigma^2."""
        raise NotImplementedError

    # -- derived ---------------------------------------------------------------------------------
    def drift(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """SDE drift f(t) x."""
        return _bcast(self.f(_t64(t)), x) * x

    def diffusion(self, t: torch.Tensor) -> torch.Tensor:
        """SDE diffusion g(t)."""
        return torch.sqrt(self.g2(_t64(t)))

    def velocity(self, x: torch.Tensor, t: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
        """PF-ODE velocity dx/dt = f x - 1/2 g^2 score (Song et al. 2021, eq. 13)."""
        t = _t64(t)
        return _bcast(self.f(t), x) * x - 0.5 * _bcast(self.g2(t), x) * score

    def velocity_s(self, x: torch.Tensor, t: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
        """PF-ODE in s = log(sigma/alpha): dx/ds = dlog(alpha)/ds x - sigma^2 score."""
        t = _t64(t)
        return _bcast(self.dlog_alpha_ds(t), x) * x - _bcast(self.sigma(t) ** 2, x) * score

    @property
    def prior_std(self) -> float:
        """Standard deviation of the Gaussian prior at T."""
        return 1.0

    def prior_sample(self, shape: tuple[int, ...], generator: torch.Generator | None = None,
                     dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> torch.Tensor:
        """Draw from the prior N(0, prior_std^2 I)."""
        z = torch.randn(shape, generator=generator, dtype=dtype, device="cpu")
        return (z * self.prior_std).to(device)

    def prior_logp(self, z: torch.Tensor) -> torch.Tensor:
        """Per-sample log-density of the prior N(0, prior_std^2 I)."""
        d = z[0].numel()
        zz = z.reshape(z.shape[0], -1).to(F64)
        var = self.prior_std**2
        return -0.5 * (zz**2).sum(1) / var - 0.5 * d * math.log(2 * math.pi * var)

    def check_t_eps(self, t_eps: float) -> float:
        """Validate 0 < t_eps < T."""
        if not (isinstance(t_eps, (int, float)) and math.isfinite(t_eps) and 0.0 < t_eps < self.T):
            raise SolverError(f"t_eps must lie in (0, T) = (0, {self.T:g}) for the {self.name} SDE; got {t_eps!r}")
        return float(t_eps)

    def to_dict(self) -> dict:
        """Plain-JSON description (name and parameters) for the store's config."""
        return {"name": self.name, **asdict(self)}  # type: ignore[call-overload]


_bcast = bcast  # the name this module uses


@dataclass(frozen=True)
class VPSDE(SDE):
    """Variance-preserving SDE, linear beta(t) = beta_min + t (beta_max - beta_min) (score_sde)."""

    beta_min: float = 0.1
    beta_max: float = 20.0

    name = "vp"
    T = 1.0

    def __post_init__(self) -> None:
        if not (0 <= self.beta_min < self.beta_max):
            raise SolverError(f"VP-SDE needs 0 <= beta_min < beta_max; got {self.beta_min}, {self.beta_max}")

    def beta(self, t: torch.Tensor) -> torch.Tensor:
        return self.beta_min + _t64(t) * (self.beta_max - self.beta_min)

    def log_alpha(self, t: torch.Tensor) -> torch.Tensor:
        t = _t64(t)
        return -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(-torch.expm1(2.0 * self.log_alpha(t)))

    def s_of_t(self, t: torch.Tensor) -> torch.Tensor:
        # sigma^2/alpha^2 = exp(-2 log alpha) - 1
        return 0.5 * torch.log(torch.expm1(-2.0 * self.log_alpha(t)))

    def t_of_s(self, s: torch.Tensor) -> torch.Tensor:
        # -log alpha = 1/2 log(1 + e^{2s}) = c solves 1/4 d t^2 + 1/2 b0 t = c (stable root)
        c = 0.5 * torch.nn.functional.softplus(2.0 * _t64(s))
        b0, d = self.beta_min, self.beta_max - self.beta_min
        return 2.0 * c / (0.5 * b0 + torch.sqrt(0.25 * b0**2 + d * c))

    def f(self, t: torch.Tensor) -> torch.Tensor:
        return -0.5 * self.beta(t)

    def g2(self, t: torch.Tensor) -> torch.Tensor:
        return self.beta(t)

    def dlog_alpha_ds(self, t: torch.Tensor) -> torch.Tensor:
        # dlog(alpha)/dt = -beta/2 and ds/dt = beta / (2 sigma^2)
        return -self.sigma(t) ** 2


@dataclass(frozen=True)
class VESDE(SDE):
    """Variance-exploding SDE, sigma(t) = sigma_min (sigma_max/sigma_min)^t, alpha = 1 (score_sde)."""

    sigma_min: float = 0.01
    sigma_max: float = 50.0

    name = "ve"
    T = 1.0

    def __post_init__(self) -> None:
        if not (0 < self.sigma_min < self.sigma_max):
            raise SolverError(f"VE-SDE needs 0 < sigma_min < sigma_max; got {self.sigma_min}, {self.sigma_max}")

    @property
    def _logr(self) -> float:
        return math.log(self.sigma_max / self.sigma_min)

    def log_alpha(self, t: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(_t64(t))

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return self.sigma_min * torch.exp(_t64(t) * self._logr)

    def s_of_t(self, t: torch.Tensor) -> torch.Tensor:
        return math.log(self.sigma_min) + _t64(t) * self._logr

    def t_of_s(self, s: torch.Tensor) -> torch.Tensor:
        return (_t64(s) - math.log(self.sigma_min)) / self._logr

    def f(self, t: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(_t64(t))

    def g2(self, t: torch.Tensor) -> torch.Tensor:
        return 2.0 * self._logr * self.sigma(t) ** 2

    def dlog_alpha_ds(self, t: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(_t64(t))

    @property
    def prior_std(self) -> float:
        return self.sigma_max


@dataclass(frozen=True)
class EDMSDE(SDE):
    """EDM parameterisation (Karras et al. 2022): alpha = 1, sigma(t) = t, t in (0, sigma_max]."""

    sigma_max: float = 80.0

    name = "edm"

    def __post_init__(self) -> None:
        if not self.sigma_max > 0:
            raise SolverError(f"EDM needs sigma_max > 0; got {self.sigma_max}")

    @property
    def T(self) -> float:  # type: ignore[override]
        return self.sigma_max

    def log_alpha(self, t: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(_t64(t))

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return _t64(t).clone()

    def s_of_t(self, t: torch.Tensor) -> torch.Tensor:
        return torch.log(_t64(t))

    def t_of_s(self, s: torch.Tensor) -> torch.Tensor:
        return torch.exp(_t64(s))

    def f(self, t: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(_t64(t))

    def g2(self, t: torch.Tensor) -> torch.Tensor:
        return 2.0 * _t64(t)

    def dlog_alpha_ds(self, t: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(_t64(t))

    @property
    def prior_std(self) -> float:
        return self.sigma_max


@dataclass(frozen=True)
class FlowSDE(SDE):
    """Flow matching / rectified flow: x_t = (1 - t) x_0 + t eps, t in [0, 1], prior N(0, I) at t = 1.

    alpha = 1 - t, sigma = t. A velocity network v(x, t) ~ E[eps - x_0 | x_t] is the PF-ODE's right-hand
    side itself, dx/dt = v; the general form f x - g^2/(2 sigma^2) (sigma^2 score) has f = -1/(1 - t) and
    g^2 = 2t/(1 - t), infinite at T = 1 (alpha = 0, s = log(sigma/alpha) = +inf), so a flow is integrated
    in t with the model's ``velocity`` (docs/math.md, "Flow matching"). diffusers' flow-matching
    schedulers call their ``sigmas`` this t and label the network with ``timestep = 1000 t``.
    """

    name = "flow"
    T = 1.0
    preferred_time_var = "t"

    def log_alpha(self, t: torch.Tensor) -> torch.Tensor:
        return torch.log1p(-_t64(t))

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        return 1.0 - _t64(t)

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return _t64(t).clone()

    def s_of_t(self, t: torch.Tensor) -> torch.Tensor:
        t = _t64(t)
        return torch.log(t) - torch.log1p(-t)

    def t_of_s(self, s: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(_t64(s))

    def f(self, t: torch.Tensor) -> torch.Tensor:
        return -1.0 / (1.0 - _t64(t))

    def g2(self, t: torch.Tensor) -> torch.Tensor:
        t = _t64(t)
        return 2.0 * t / (1.0 - t)

    def dlog_alpha_ds(self, t: torch.Tensor) -> torch.Tensor:
        # dlog(alpha)/dt = -1/(1 - t), ds/dt = 1/(t (1 - t))
        return -_t64(t).clone()


SDE_NAMES = {"vp": VPSDE, "ve": VESDE, "edm": EDMSDE, "flow": FlowSDE}


def make_sde(name: str = "vp", **params: float) -> SDE:
    """Build an SDE by name ('vp', 've', 'edm', 'flow') with optional parameters."""
    try:
        cls = SDE_NAMES[name]
    except KeyError:
        raise SolverError(f"unknown SDE {name!r}; choose one of {sorted(SDE_NAMES)}") from None
    try:
        return cls(**params)
    except TypeError as e:
        raise SolverError(f"bad parameters for the {name} SDE: {e}") from None
