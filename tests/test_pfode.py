"""pflatents.tasks.ode.pfode: encode/decode against exact answers, adapters end to end, likelihood, grids, bad input."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from problems import SDES, gaussian, make_adapters, random_gmm, t64
from pflatents.tasks.errors import DataError, SolverError
from pflatents.tasks.ode.pfode import GRIDS, SolverConfig, decode, encode, integrate, make_grid

F64 = torch.float64
T_EPS = 1e-5
EXACT = SolverConfig("dopri5", rtol=1e-7, atol=1e-7, t_eps=T_EPS)


# ---- Gaussian data: the exact affine flow map, both directions --------------------------------------

@pytest.fixture(scope="module")
def gauss():
    g = gaussian(d=4, seed=0)
    return g, g.sample(16, seed=1), np.random.default_rng(3).standard_normal((16, 4))


@pytest.mark.parametrize("time_var", ["t", "s"])
@pytest.mark.parametrize("name", ["vp", "ve", "edm"])
def test_gaussian_encode_decode_match_exact_map(gauss, name, time_var):
    g, x0, z = gauss
    sde = SDES[name]()
    m = g.model(sde)
    cfg = dataclasses.replace(EXACT, time_var=time_var)
    enc = encode(m, sde, t64(x0), cfg)
    assert bool(enc.ok.all()) and enc.logp is None and enc.bpd is None
    ref = g.flow(sde, x0, T_EPS, sde.T)
    # the default time variable (t) meets 1e-5 outright; in s, EDM's O(100) latents (sigma_max 80) end
    # 1.3e-7 relative off at rtol 1e-7 (1.3e-5 absolute): that option is held to 1e-5 + 1e-7 |z|
    slack = 0.0 if time_var == "t" else 1e-7 * np.abs(ref)
    assert (np.abs(enc.x.numpy() - ref) - slack).max() <= 1e-5
    z = z * sde.prior_std
    dec = decode(m, sde, t64(z), cfg)
    assert bool(dec.ok.all())
    assert np.abs(dec.x.numpy() - g.flow(sde, z, sde.T, T_EPS)).max() <= 1e-5
    back = decode(m, sde, enc.x, cfg)
    assert np.abs(back.x.numpy() - x0).max() <= 1e-5


def test_vp_latents_are_nearly_whitened(gauss):
    """At T the exact map is ZCA whitening up to alpha(1): a sanity check on the oracle itself."""
    g, _, _ = gauss
    sde = SDES["vp"]()
    lam, u = g.eig()
    x = g.mu + np.random.default_rng(0).standard_normal((3, 4)) @ (u * np.sqrt(lam)).T
    zca = (x - g.mu) @ (u / np.sqrt(lam)) @ u.T
    assert np.abs(g.flow(sde, x, T_EPS, 1.0) - zca).max() < 2e-2  # off by alpha(1) mu and O(sigma(t_eps)^2)


@pytest.mark.parametrize("shape", [(2, 2), (1, 2, 2)])
def test_image_shaped_batches(gauss, shape):
    g, x0, _ = gauss
    sde = SDES["vp"]()
    flat = encode(g.model(sde), sde, t64(x0[:3]), EXACT)
    shaped = encode(g.model(sde), sde, t64(x0[:3]).reshape(3, *shape), EXACT)
    assert shaped.x.shape == (3, *shape)
    torch.testing.assert_close(shaped.x.reshape(3, 4), flat.x, rtol=0, atol=1e-14)


# ---- Gaussian mixture: independent scipy reference in plain t ---------------------------------------

@pytest.fixture(scope="module")
def mixture():
    gm = random_gmm(d=3, k=3, seed=0)
    return gm, gm.sample(3, seed=5), np.random.default_rng(7).standard_normal((3, 3))


def assert_latents_close(got: np.ndarray, ref: np.ndarray) -> None:
    """|got - ref| <= 1e-4 + 1e-5 |ref|: 1e-4 for O(1) latents (VP); VE/EDM latents are O(50-100)
    and a solver at rtol = 1e-6 accumulates error relative to them (measured: 1.2e-6 relative)."""
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("time_var", ["t", "s"])
@pytest.mark.parametrize("name", ["vp", "ve", "edm"])
def test_gmm_matches_solve_ivp_reference(mixture, name, time_var):
    gm, x0, z = mixture
    sde = SDES[name]()
    m = gm.model(sde)
    cfg = SolverConfig("dopri5", rtol=1e-6, atol=1e-6, t_eps=T_EPS, time_var=time_var)
    enc = encode(m, sde, t64(x0), cfg)
    assert_latents_close(enc.x.numpy(), gm.reference_flow(sde, x0, T_EPS, sde.T))
    z = z * sde.prior_std
    dec = decode(m, sde, t64(z), cfg)
    assert_latents_close(dec.x.numpy(), gm.reference_flow(sde, z, sde.T, T_EPS))
    assert bool(enc.ok.all() and dec.ok.all())


@pytest.mark.parametrize("solver", ["dopri5", "dpmpp2m"])
@pytest.mark.parametrize("adapter", ["eps", "v", "denoiser"])
@pytest.mark.parametrize("name", ["vp", "ve"])
def test_adapters_give_the_same_latents(mixture, name, adapter, solver):
    """Through each adapter (dopri5: sigma^2 score in F; dpmpp2m: the data prediction) the latents are the GMM's."""
    gm, x0, _ = mixture
    sde = SDES[name]()
    m = gm.model(sde)
    cfg = SolverConfig(solver, rtol=1e-6, atol=1e-6, steps=50, t_eps=T_EPS)
    ref = encode(m, sde, t64(x0), cfg)
    got = encode(make_adapters(m, gm)[adapter], sde, t64(x0), cfg)
    torch.testing.assert_close(got.x, ref.x, rtol=1e-9, atol=1e-9 * sde.prior_std)
    if solver == "dopri5":
        back = decode(make_adapters(m, gm)[adapter], sde, got.x, cfg)
        assert np.abs(back.x.numpy() - x0).max() < 1e-4


# ---- likelihood -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def zero_mean_gmm():
    gm = random_gmm(d=3, k=2, seed=0, mean_scale=0.0)
    return gm, gm.sample(4, seed=1)


def prior_gap_bound(gm, sde, z: np.ndarray) -> np.ndarray:
    """Bound on |log N(z; 0, p^2 I) - log p_T(z)| for a zero-mean mixture, per sample.

    log p_T lies between its components' log densities, and for N(0, S_k) vs N(0, p^2 I) the
    difference is 1/2 sum log(S_ki / p^2) - 1/2 z^T (I/p^2 - S_k^-1) z, bounded by eigenvalues.
    """
    a, s, p2 = sde.alpha(torch.tensor(sde.T)).item(), sde.sigma(torch.tensor(sde.T)).item(), sde.prior_std**2
    r2 = (z**2).sum(1)
    per_k = [0.5 * abs(np.log((a * a * lam + s * s) / p2).sum()) + 0.5 * r2 * np.abs(1 / p2 - 1 / (a * a * lam + s * s)).max()
             for lam in np.linalg.eigvalsh(gm.covs)]
    return np.max(per_k, axis=0)


@pytest.mark.parametrize("name", ["vp", "ve", "edm"])
def test_exact_likelihood_matches_log_density(zero_mean_gmm, name):
    gm, x0 = zero_mean_gmm
    sde = SDES[name]()
    res = encode(gm.model(sde), sde, t64(x0), SolverConfig("dopri5", rtol=1e-8, atol=1e-8, t_eps=T_EPS), likelihood="exact")
    truth = gm.log_prob(sde, x0, T_EPS)
    z = res.x.numpy()
    # 1) the ODE part alone is exact: logp - log prior(z) + log p_T(z) = log p_{t_eps}(x0)
    ode_part = res.logp.numpy() - sde.prior_logp(res.x).numpy()
    np.testing.assert_allclose(ode_part + gm.log_prob(sde, z, sde.T), truth, rtol=0, atol=1e-6)
    # 2) end to end, off only by the prior approximation p_T ~ N(0, prior_std^2 I), which is bounded
    #    analytically (VP: alpha(1)^2 = 4.3e-5 scale; VE/EDM: trace(C) / sigma_max^2 scale)
    bound = prior_gap_bound(gm, sde, z)
    assert bound.max() < 5e-3
    assert (np.abs(res.logp.numpy() - truth) <= bound + 1e-6).all()
    torch.testing.assert_close(res.bpd, -res.logp / (3 * math.log(2)))


@pytest.fixture(scope="module")
def hutch_setup():
    gm = random_gmm(d=3, k=2, seed=0, mean_scale=0.5)
    sde = SDES["vp"]()
    return gm, gm.model(sde), sde, gm.sample(5, seed=2)


HUTCH_CFG = SolverConfig("dopri5", rtol=1e-6, atol=1e-6, t_eps=T_EPS)


def test_hutchinson_is_unbiased(hutch_setup):
    """128 probe draws for one x0 (distinct sample indices): mean within 4 standard errors of exact."""
    gm, m, sde, x = hutch_setup
    exact = encode(m, sde, t64(x[:1]), HUTCH_CFG, likelihood="exact").logp.item()
    n = 128
    res = encode(m, sde, t64(np.repeat(x[:1], n, 0)), HUTCH_CFG, likelihood="hutchinson", seed=11)
    lp = res.logp.numpy()
    assert lp.std() > 1e-3  # it is an estimate, not the exact trace
    assert abs(lp.mean() - exact) < 4 * lp.std() / math.sqrt(n)
    assert bool(res.ok.all())


def test_hutchinson_is_deterministic_per_sample(hutch_setup):
    gm, m, sde, x = hutch_setup
    idx = torch.arange(100, 105)
    batch = encode(m, sde, t64(x), HUTCH_CFG, likelihood="hutchinson", seed=3, sample_index=idx)
    again = encode(m, sde, t64(x), HUTCH_CFG, likelihood="hutchinson", seed=3, sample_index=idx)
    torch.testing.assert_close(again.logp, batch.logp, rtol=0, atol=0)
    for i in (0, 3):
        alone = encode(m, sde, t64(x[i : i + 1]), HUTCH_CFG, likelihood="hutchinson", seed=3, sample_index=idx[i : i + 1])
        torch.testing.assert_close(alone.logp[0], batch.logp[i], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(alone.x[0], batch.x[i], rtol=1e-10, atol=1e-10)
    other = encode(m, sde, t64(x), HUTCH_CFG, likelihood="hutchinson", seed=4, sample_index=idx)
    assert (other.logp - batch.logp).abs().max() > 1e-4  # another seed draws other probes
    torch.testing.assert_close(batch.x, encode(m, sde, t64(x), HUTCH_CFG).x, rtol=1e-4, atol=1e-4)


def test_likelihood_argument_errors(hutch_setup):
    _, m, sde, x = hutch_setup
    with pytest.raises(SolverError, match="'bogus'"):
        encode(m, sde, t64(x), HUTCH_CFG, likelihood="bogus")
    with pytest.raises(SolverError, match="'dpmpp2m'"):
        encode(m, sde, t64(x), SolverConfig("dpmpp2m", steps=10), likelihood="exact")


# ---- grids ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", GRIDS)
@pytest.mark.parametrize("name", ["vp", "ve", "edm"])
def test_grid_endpoints_and_direction(name, kind):
    sde = SDES[name]()
    up = make_grid(sde, T_EPS, sde.T, 12, kind)
    s_lo, s_hi = (sde.s_of_t(torch.tensor(t, dtype=F64)).item() for t in (T_EPS, sde.T))
    assert up.shape == (13,) and up[0].item() == s_lo and up[-1].item() == s_hi
    assert (up.diff() > 0).all()
    torch.testing.assert_close(make_grid(sde, sde.T, T_EPS, 12, kind), up.flip(0), rtol=0, atol=0)


def test_grid_kinds_are_what_they_say():
    sde = SDES["vp"]()

    def uniform(g):  # equal increments
        return torch.allclose(g.diff(), (g[-1] - g[0]) / (len(g) - 1), rtol=1e-10, atol=0)

    assert uniform(make_grid(sde, 0.1, 0.9, 8, "logsnr"))  # uniform in s = -log-SNR / 2
    assert uniform(sde.t_of_s(make_grid(sde, 0.1, 0.9, 8, "time")))  # uniform in t
    edm = make_grid(sde, 0.1, 0.9, 8, "edm")
    assert uniform(torch.exp(edm / 7.0)) and not uniform(edm)  # (sigma/alpha)^(1/rho) uniform, rho = 7


# ---- bad input --------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    (dict(t_eps=0.0), r"t_eps must be a finite number > 0; got 0\.0"),
    (dict(t_eps=-1e-3), r"t_eps must be a finite number > 0; got -0\.001"),
    (dict(t_eps=float("nan")), r"t_eps must be a finite number > 0; got nan"),
    (dict(rtol=0.0), r"rtol must be a finite number > 0; got 0\.0"),
    (dict(atol=-1e-6), r"atol must be a finite number > 0; got -1e-06"),
    (dict(name="rk45"), r"unknown solver 'rk45'; choose one of euler, heun, rk4, dopri5, dop853, dpm23, adams4, adams5, dpmpp2m"),
    (dict(name="rk4", steps=0), r"steps must be an integer >= 1 .*'rk4'; got 0"),
    (dict(name="euler", steps=2.5), r"steps must be an integer >= 1 .*got 2\.5"),
    (dict(grid="cosine"), r"unknown time grid 'cosine'"),
    (dict(max_steps=0), r"max_steps must be an integer >= 1; got 0"),
    (dict(time_var="logsnr"), r"unknown time variable 'logsnr'; choose one of auto, t, s"),
])
def test_bad_solver_settings(kwargs, message):
    with pytest.raises(SolverError, match=message):
        SolverConfig(**kwargs)


@pytest.mark.parametrize("name", ["vp", "ve", "edm"])
def test_t_eps_at_or_beyond_T(gauss, name):
    g, x0, _ = gauss
    sde = SDES[name]()
    for t_eps in (sde.T, 2 * sde.T):
        cfg = SolverConfig("dopri5", t_eps=t_eps)
        with pytest.raises(SolverError, match=rf"t_eps must lie in \(0, T\) = \(0, {sde.T:g}\).*got {t_eps!r}"):
            encode(g.model(sde), sde, t64(x0), cfg)
        with pytest.raises(SolverError, match=rf"got {t_eps!r}"):
            decode(g.model(sde), sde, t64(x0), cfg)


def test_make_grid_unknown_kind():
    with pytest.raises(SolverError, match="unknown time grid 'cosine'"):
        make_grid(SDES["vp"](), T_EPS, 1.0, 4, "cosine")


@pytest.mark.parametrize("solver", ["dopri5", "rk4", "dpmpp2m"])
def test_data_dimension_mismatch(gauss, solver):
    g, _, _ = gauss
    sde = SDES["vp"]()
    with pytest.raises(DataError, match=r"\(5,\) \(5 values\).*D = 4"):
        encode(g.model(sde), sde, torch.zeros(2, 5, dtype=F64), SolverConfig(solver, steps=4))
    with pytest.raises(DataError, match="D = 4"):
        decode(g.model(sde), sde, torch.zeros(2, 2, 3, dtype=F64), SolverConfig(solver, steps=4))


def test_empty_or_unbatched_input(gauss):
    g, _, _ = gauss
    sde = SDES["vp"]()
    for bad in (torch.zeros(0, 4, dtype=F64), torch.zeros(4, dtype=F64)):
        with pytest.raises(SolverError, match="non-empty batch"):
            integrate(g.model(sde), sde, bad, T_EPS, 1.0, EXACT)


def test_time_variable_changes_the_path_not_the_answer(mixture):
    """t and s are two integrations of one ODE: latents agree to the tolerance, the NFE differ, and
    "auto" is t for the VP SDE."""
    gm, x0, _ = mixture
    sde = SDES["vp"]()
    m = gm.model(sde)
    runs = {tv: encode(m, sde, t64(x0), SolverConfig(rtol=1e-8, atol=1e-8, time_var=tv)) for tv in ("t", "s", "auto")}
    torch.testing.assert_close(runs["t"].x, runs["s"].x, rtol=0, atol=1e-6)
    assert not torch.equal(runs["t"].nfe, runs["s"].nfe)
    assert torch.equal(runs["auto"].x, runs["t"].x) and torch.equal(runs["auto"].nfe, runs["t"].nfe)


def test_pinned_configs_without_time_var_keep_integrating_in_s():
    """Stores pinned before time_var existed integrated dopri5 in s; resuming them must not switch."""
    from pflatents.tasks.config import solver_from_dict

    legacy = {"name": "dopri5", "t_eps": 1e-5, "rtol": 5e-7, "atol": 5e-7, "max_steps": 10000}
    assert solver_from_dict(legacy).time_var == "s"
    assert solver_from_dict(SolverConfig().to_dict()) == SolverConfig()
    assert solver_from_dict({"name": "rk4", "t_eps": 1e-5, "steps": 8, "grid": "logsnr"}).time_var == "auto"
