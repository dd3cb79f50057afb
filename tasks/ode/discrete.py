"""The discrete DDPM schedule as a continuous-time VP SDE (for diffusers models).

A DDPM with ``N`` training steps defines ``alpha_bar_i = prod_{j<=i} (1 - beta_j)``, ``i = 0 .. N-1``,
and trains at ``x_i = sqrt(alpha_bar_i) x_0 + sqrt(1 - alpha_bar_i) eps`` with the integer label ``i``.

Continuous time (the interpolation, stated once): knots ``t_k = k / N``, ``k = 0 .. N``, with
``log alpha_bar(t_0 = 0) = 0`` and ``log alpha_bar(t_{i+1}) = log alpha_bar_i``; ``log alpha_bar`` is
piecewise linear in ``t`` between knots. So ``alpha(t) = alpha_bar(t)^(1/2)``, ``sigma(t)^2 = 1 - alpha_bar(t)``,
and the schedule passes exactly through every trained noise level at ``t = (i + 1) / N``, where the
model's time label (timestep index) is ``i = t N - 1`` (a float between knots). Inside a segment
``beta(t) = -d log alpha_bar / dt`` is constant (the continuous analogue of ``-N log(1 - beta_i)``).
For any VP-type schedule ``d log(alpha)/ds = -sigma^2``, so the PF-ODE in ``s`` does not see the kinks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pflatents.tasks.errors import ModelError
from pflatents.tasks.ode.sde import SDE

__all__ = ["DiscreteVPSDE"]

F64 = torch.float64


def _t64(t) -> torch.Tensor:
    return torch.as_tensor(t, dtype=F64)


@dataclass(frozen=True)
class DiscreteVPSDE(SDE):
    """VP SDE through the knots of a discrete schedule ``alphas_cumprod`` (length N)."""

    alphas_cumprod: tuple[float, ...] = ()

    name = "vp_discrete"
    T = 1.0

    preferred_time_var = "s"  # log alpha_bar is piecewise linear in t: smooth in s, kinked in t

    def __post_init__(self) -> None:
        ab = tuple(float(a) for a in self.alphas_cumprod)
        object.__setattr__(self, "alphas_cumprod", ab)
        if len(ab) < 2:
            raise ModelError("a discrete VP schedule needs at least 2 alphas_cumprod values")
        a = torch.tensor(ab, dtype=F64)
        if not (torch.isfinite(a).all() and (a > 0).all() and (a < 1).all()):
            raise ModelError("alphas_cumprod must lie strictly in (0, 1): a zero-terminal-SNR schedule "
                             "(alpha_bar = 0 at the last step) has no finite PF-ODE latent at T")
        if not (a[1:] < a[:-1]).all():
            raise ModelError("alphas_cumprod must be strictly decreasing (every beta > 0)")
        # log alpha_bar at the knots t_k = k/N, k = 0..N (log alpha_bar(0) = 0)
        la = torch.cat([torch.zeros(1, dtype=F64), torch.log(a)])
        object.__setattr__(self, "_la", la)
        object.__setattr__(self, "_n", len(ab))

    @property
    def num_train_timesteps(self) -> int:
        return self._n

    # -- piecewise-linear log alpha_bar ---------------------------------------------------------
    def _segment(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Segment index k (t in [k/N, (k+1)/N]) and the local slope d log alpha_bar / dt there."""
        t = _t64(t)
        la = self._la.to(t.device)
        k = torch.clamp(torch.floor(t * self._n), 0, self._n - 1).long()
        slope = (la[k + 1] - la[k]) * self._n
        return k, slope

    def log_alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
        """log alpha_bar(t), piecewise linear between the knots (extrapolated linearly past [0, 1])."""
        t = _t64(t)
        k, slope = self._segment(t)
        return self._la.to(t.device)[k] + slope * (t - k.to(F64) / self._n)

    def log_alpha(self, t: torch.Tensor) -> torch.Tensor:
        return 0.5 * self.log_alpha_bar(t)

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(-torch.expm1(self.log_alpha_bar(t)))

    def s_of_t(self, t: torch.Tensor) -> torch.Tensor:
        # s = 1/2 log(sigma^2 / alpha^2) = 1/2 log(exp(-log alpha_bar) - 1)
        return 0.5 * torch.log(torch.expm1(-self.log_alpha_bar(t)))

    def t_of_s(self, s: torch.Tensor) -> torch.Tensor:
        """Exact inverse: log alpha_bar = -softplus(2 s), then invert the linear piece holding it."""
        s = _t64(s)
        target = -torch.nn.functional.softplus(2.0 * s)
        neg = (-self._la).to(s.device)  # increasing in k
        k = torch.clamp(torch.searchsorted(neg, -target.contiguous(), right=True) - 1, 0, self._n - 1)
        la = self._la.to(s.device)
        frac = (target - la[k]) / (la[k + 1] - la[k])
        return (k.to(F64) + frac) / self._n

    def f(self, t: torch.Tensor) -> torch.Tensor:
        return 0.5 * self._segment(t)[1]

    def g2(self, t: torch.Tensor) -> torch.Tensor:
        # d(sigma^2)/dt - 2 f sigma^2 = -alpha_bar' - slope (1 - alpha_bar) = -slope
        return -self._segment(t)[1]

    def dlog_alpha_ds(self, t: torch.Tensor) -> torch.Tensor:
        return -self.sigma(t) ** 2

    def timestep(self, t: torch.Tensor) -> torch.Tensor:
        """The model's time label: timestep index i = t N - 1 (float; exact at the knots)."""
        return _t64(t) * self._n - 1.0

    def to_dict(self) -> dict:
        return {"name": self.name, "alphas_cumprod": list(self.alphas_cumprod)}
