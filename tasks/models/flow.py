"""Velocity-parameterised networks: flow matching / rectified flow, and any model that predicts dx/dt.

Flow matching (Lipman et al. 2023; rectified flow, Liu et al. 2023; diffusers'
``FlowMatchEulerDiscreteScheduler``) trains ``v(x_t, t) ~ E[eps - x_0 | x_t]`` on
``x_t = (1 - t) x_0 + t eps``, which is the ``flow`` SDE of ``pflatents.tasks.ode.sde`` (alpha = 1 - t,
sigma = t, T = 1, prior N(0, I)). Its probability-flow ODE is the learned velocity itself,
``dx/dt = v``, so ``VelocityScore.velocity`` is what the solver integrates (in t: at T = 1 alpha is 0 and
s = log(sigma/alpha) is infinite). The contract's one form follows from it:
``sigma^2 score = -sigma eps_hat = -t (x + (1 - t) v)``, since ``eps_hat = x + (1 - t) v`` and
``x0_hat = x - t v``.

Under any other SDE a velocity network predicts that SDE's PF-ODE right-hand side
``dx/dt = f x - g^2/(2 sigma^2) (sigma^2 score)``, so ``sigma^2 score = 2 sigma^2/g^2 (f x - v)``.

Time convention against diffusers: diffusers calls t ``sigma`` and labels the network with
``timestep = sigma * num_train_timesteps`` (1000); its ``shift`` (and dynamic shifting) only moves the
sampling grid, never the ODE, so it does not enter the latent. An adaptive solver is unaffected by it.
"""

from __future__ import annotations

import torch

from pflatents.tasks.core import Cond, bcast as _bcast
from pflatents.tasks.models.scores import NetworkModel

__all__ = ["VelocityScore"]


class VelocityScore(NetworkModel):
    """A network ``net(x, label[, cond])`` that predicts the PF-ODE velocity dx/dt in the SDE's own time."""

    def velocity(self, x: torch.Tensor, t: torch.Tensor, cond: Cond = None) -> torch.Tensor:
        """dx/dt: the network's prediction (for a flow, v = eps - x0)."""
        return self._predict(x, t, cond)

    def sigma2_score(self, x: torch.Tensor, t: torch.Tensor, cond: Cond = None) -> torch.Tensor:
        v = self.velocity(x, t, cond)
        if self.sde.name == "flow":  # -t (x + (1 - t) v): finite at t = 1, where f and g^2 are not
            tt = _bcast(t, x)
            return -tt * (x + (1 - tt) * v)
        c = 2.0 * self.sde.sigma(t) ** 2 / self.sde.g2(t)
        return _bcast(c, x) * (_bcast(self.sde.f(t), x) * x - v)

    def x0(self, x: torch.Tensor, t: torch.Tensor, cond: Cond = None) -> torch.Tensor:
        """The clean-sample estimate (Tweedie): x0_hat = (x + sigma^2 score) / alpha; x - t v for a flow."""
        if self.sde.name == "flow":
            return x - _bcast(t, x) * self.velocity(x, t, cond)
        return (x + self.sigma2_score(x, t, cond)) / _bcast(self.sde.alpha(t), x)
