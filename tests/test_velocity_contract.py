"""The model contract's ``velocity(x, t, cond)``: the PF-ODE right-hand side the solver integrates in t.

A score model's default (``ModelBase.velocity``) is ``f x - g^2/(2 sigma^2) sigma^2 score``, checked here
against the closed form of an exact Gaussian's PF-ODE; a flow model overrides it with its prediction,
and the solver must use that one (the default is 0/0 at the flow's t = 1)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pflatents.tasks.core import ModelBase
from pflatents.tasks.models.scores import GaussianMixtureScore
from pflatents.tasks.ode.pfode import SolverConfig, decode, encode, ode_func_t
from pflatents.tasks.ode.sde import EDMSDE, FlowSDE, VESDE, VPSDE

F64 = torch.float64
MU = torch.tensor([0.5, -1.0, 2.0], dtype=F64)
LAM = torch.tensor([0.3, 1.0, 2.5], dtype=F64)  # the data's covariance diag(LAM)


def _gaussian(sde):
    return GaussianMixtureScore([1.0], [MU.tolist()], [torch.diag(LAM).tolist()], sde)


def _points(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=g, dtype=F64) * 2


@pytest.mark.parametrize("sde", [VPSDE(), VESDE(), EDMSDE()], ids=["vp", "ve", "edm"])
def test_default_velocity_is_the_pf_ode_rhs_of_an_exact_gaussian(sde):
    """N(MU, diag(LAM)) diffuses to N(alpha MU, alpha^2 LAM + sigma^2): score = -(x - alpha MU) / that
    variance, and dx/dt = f x - g^2/2 score (Song et al. 2021, eq. 13), written out here in float64."""
    model = _gaussian(sde)
    x = _points()
    t = torch.linspace(0.05, 0.95, x.shape[0], dtype=F64) * sde.T
    a, s2 = sde.alpha(t)[:, None], (sde.sigma(t) ** 2)[:, None]
    score = -(x - a * MU) / (a * a * LAM + s2)
    rhs = sde.f(t)[:, None] * x - 0.5 * sde.g2(t)[:, None] * score
    torch.testing.assert_close(model.velocity(x, t), rhs, rtol=1e-11, atol=1e-12)
    # the solver's right-hand side in t is the model's velocity
    torch.testing.assert_close(ode_func_t(model, sde, (3,))(x, t), model.velocity(x, t), rtol=0, atol=0)


def _flow_velocity(x, t, mu, lam):
    """The exact flow-matching velocity E[eps - x0 | x_t] of N(mu, diag(lam)) on x_t = (1 - t) x0 + t eps."""
    t = t[:, None]
    v = (1 - t) ** 2 * lam + t**2
    return -mu + (t - (1 - t) * lam) / v * (x - (1 - t) * mu)


class ExactFlow(ModelBase):
    """A flow model of N(MU, diag(LAM)) that predicts the velocity; its scaled score must not be used by
    the solver in t (it raises), so a latent at T = 1 proves the solver called ``velocity``."""

    dim = 3

    def __init__(self):
        self.sde, self.calls = FlowSDE(), 0

    def velocity(self, x, t, cond=None):
        self.calls += 1
        return _flow_velocity(x, t.to(x.dtype), MU.to(x.dtype), LAM.to(x.dtype))

    def sigma2_score(self, x, t, cond=None):
        raise AssertionError("the solver in t must integrate the model's velocity, not the score")


def test_a_flow_models_velocity_is_what_the_solver_integrates():
    sde, model = FlowSDE(), ExactFlow()
    x0 = MU + torch.sqrt(LAM) * _points(seed=1)
    te = 1e-3
    cfg = SolverConfig("dopri5", rtol=1e-10, atol=1e-10, t_eps=te)
    z = encode(model, sde, x0, cfg).x
    exact = (x0 - (1 - te) * MU) / torch.sqrt((1 - te) ** 2 * LAM + te**2)
    torch.testing.assert_close(z, exact, rtol=0, atol=1e-7)
    torch.testing.assert_close(decode(model, sde, z, cfg).x, x0, rtol=0, atol=1e-7)
    assert model.calls > 0
    # the default built from the score agrees with it below t = 1 (an exact Gaussian under flow), and is
    # what a flow model cannot use at t = 1: f = -1/(1 - t) there
    gmm = _gaussian(sde)
    x, t = _points(seed=2), torch.linspace(0.1, 0.9, 6, dtype=F64)
    torch.testing.assert_close(gmm.velocity(x, t), model.velocity(x, t), rtol=1e-10, atol=1e-10)
    one = torch.ones(6, dtype=F64)
    assert torch.isfinite(model.velocity(x, one)).all() and not torch.isfinite(gmm.velocity(x, one)).all()


def test_a_latent_flow_model_forwards_its_velocity():
    """A VAE + flow network (``LatentModel``) integrates the inner network's velocity, finite at t = 1."""
    from pflatents.tasks.models.diffusers import LatentModel

    inner = ExactFlow()
    inner.sample_shape = (3,)
    latent = LatentModel(inner, vae=None, vae_cls="AutoencoderKL", scale=1.0, shift=0.0, data_shape=(3, 2, 2))
    x, one = _points(seed=3), torch.ones(6, dtype=F64)
    v = latent.velocity(x, one)
    assert torch.isfinite(v).all()
    torch.testing.assert_close(v, _flow_velocity(x, one, MU, LAM), rtol=0, atol=0)
