"""pflatents.tasks.ode.sde: schedule constants, s <-> t inversion, and the PF-ODE coefficients against finite differences."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from problems import SDES, schedule
from pflatents.tasks.errors import SolverError
from pflatents.tasks.ode.sde import EDMSDE, VESDE, VPSDE, make_sde

F64 = torch.float64


def t_grid(sde, n: int = 41) -> torch.Tensor:
    """Log-spaced times from 1e-6 T to T (covers the t_eps end and the prior end)."""
    return torch.logspace(math.log10(1e-6 * sde.T), math.log10(sde.T), n, dtype=F64)


def fd(fn, t: torch.Tensor, rel: float = 1e-6) -> torch.Tensor:
    """Central finite difference d fn / dt with a step relative to t."""
    h = rel * t
    return (fn(t + h) - fn(t - h)) / (2 * h)


def test_vp_constants_at_T():
    sde = VPSDE()
    assert sde.alpha(torch.tensor(1.0)).item() == pytest.approx(math.exp(-5.025), rel=1e-14)
    assert sde.alpha(torch.tensor(1.0)).item() == pytest.approx(6.5716e-3, abs=1e-7)
    assert sde.sigma(torch.tensor(1.0)).item() == pytest.approx(0.99997841, abs=1e-8)


def test_ve_and_edm_schedules():
    ve, edm = VESDE(), EDMSDE()
    assert ve.sigma(torch.tensor(0.0)).item() == pytest.approx(0.01, rel=1e-14)
    assert ve.sigma(torch.tensor(1.0)).item() == pytest.approx(50.0, rel=1e-14)
    t = t_grid(edm)
    torch.testing.assert_close(edm.sigma(t), t, rtol=0, atol=0)  # EDM: sigma(t) = t exactly
    torch.testing.assert_close(edm.alpha(t), torch.ones_like(t), rtol=0, atol=0)
    assert edm.T == 80.0 and EDMSDE(sigma_max=3.0).T == 3.0
    assert ve.prior_std == 50.0 and edm.prior_std == 80.0 and VPSDE().prior_std == 1.0


@pytest.mark.parametrize("name", ["vp", "ve", "edm"])
def test_alpha_sigma_match_restated_formulas(name):
    sde = SDES[name]()
    sch, t = schedule(sde), t_grid(sde)
    np.testing.assert_allclose(sde.alpha(t).numpy(), sch.alpha(t.numpy()), rtol=1e-13)
    np.testing.assert_allclose(sde.sigma(t).numpy(), sch.sigma(t.numpy()), rtol=1e-13)
    np.testing.assert_allclose(sde.f(t).numpy(), sch.f(t.numpy()), rtol=1e-13, atol=1e-300)
    np.testing.assert_allclose(sde.g2(t).numpy(), sch.g2(t.numpy()), rtol=1e-13)


@pytest.mark.parametrize("name", ["vp", "ve", "edm"])
def test_s_is_log_sigma_over_alpha_and_increasing(name):
    sde = SDES[name]()
    t = t_grid(sde)
    s = sde.s_of_t(t)
    torch.testing.assert_close(s, torch.log(sde.sigma(t) / sde.alpha(t)), rtol=1e-12, atol=1e-12)
    assert (s.diff() > 0).all()


@pytest.mark.parametrize("name", ["vp", "ve", "edm"])
def test_t_of_s_inverts_s_of_t(name):
    sde = SDES[name]()
    t = torch.cat([t_grid(sde), torch.tensor([1e-9 * sde.T, 0.5 * sde.T], dtype=F64)])
    torch.testing.assert_close(sde.t_of_s(sde.s_of_t(t)), t, rtol=1e-11, atol=1e-15 * sde.T)
    s = torch.linspace(-12.0, 6.0, 37, dtype=F64)
    torch.testing.assert_close(sde.s_of_t(sde.t_of_s(s)), s, rtol=0, atol=1e-11)


@pytest.mark.parametrize("name", ["vp", "ve", "edm"])
def test_coefficients_match_finite_differences(name):
    """f = dlog(alpha)/dt, g2 = d(sigma^2)/dt - 2 f sigma^2, dlog(alpha)/ds = f / (ds/dt)."""
    sde = SDES[name]()
    t = t_grid(sde)[5:-1]  # keep t - h > 0 and t + h <= T
    f_fd = fd(sde.log_alpha, t)
    torch.testing.assert_close(sde.f(t), f_fd, rtol=1e-7, atol=1e-9)
    g2_fd = fd(lambda u: sde.sigma(u) ** 2, t) - 2 * f_fd * sde.sigma(t) ** 2
    torch.testing.assert_close(sde.g2(t), g2_fd, rtol=1e-6, atol=1e-9)
    dla_ds = f_fd / fd(sde.s_of_t, t)
    torch.testing.assert_close(sde.dlog_alpha_ds(t), dla_ds, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name", ["vp", "ve", "edm"])
def test_velocity_is_velocity_s_times_ds_dt(name):
    sde = SDES[name]()
    t = t_grid(sde, 7)[1:-1]
    gen = torch.Generator().manual_seed(0)
    x, score = torch.randn(5, 3, generator=gen, dtype=F64), torch.randn(5, 3, generator=gen, dtype=F64)
    ds_dt = fd(sde.s_of_t, t)
    v_t = sde.velocity(x, t, score)
    v_s = sde.velocity_s(x, t, score) * ds_dt[:, None]
    torch.testing.assert_close(v_t, v_s, rtol=1e-6, atol=1e-9)
    # and the t-form is literally f x - 1/2 g2 score
    torch.testing.assert_close(v_t, sde.f(t)[:, None] * x - 0.5 * sde.g2(t)[:, None] * score)


@pytest.mark.parametrize("name", ["vp", "ve", "edm"])
def test_prior_logp_is_isotropic_gaussian(name):
    sde = SDES[name]()
    z = torch.randn(4, 2, 3, generator=torch.Generator().manual_seed(1), dtype=F64) * sde.prior_std
    ref = torch.distributions.Normal(0.0, sde.prior_std).log_prob(z).reshape(4, -1).sum(1)
    torch.testing.assert_close(sde.prior_logp(z), ref)


@pytest.mark.parametrize("t_eps", [0.0, -1e-3, 1.0, 2.0, float("nan")])
def test_check_t_eps_rejects_outside_open_interval(t_eps):
    with pytest.raises(SolverError, match=r"t_eps must lie in \(0, T\).*" + (r"nan" if t_eps != t_eps else repr(t_eps))):
        VPSDE().check_t_eps(t_eps)


def test_check_t_eps_edm_uses_sigma_max():
    assert EDMSDE().check_t_eps(50.0) == 50.0
    with pytest.raises(SolverError, match="80"):
        EDMSDE().check_t_eps(80.0)


def test_make_sde_by_name_and_errors():
    assert make_sde("ve", sigma_max=10.0).sigma(torch.tensor(1.0)).item() == pytest.approx(10.0)
    with pytest.raises(SolverError, match="'cosine'"):
        make_sde("cosine")
    with pytest.raises(SolverError, match="vp"):
        make_sde("vp", beta=3.0)
    with pytest.raises(SolverError, match="beta_min < beta_max"):
        VPSDE(beta_min=20.0, beta_max=0.1)
