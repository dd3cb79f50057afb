"""Degenerate data directions, the latent spectrum and the true prior p_T, against known answers."""

from __future__ import annotations

import numpy as np
import pytest

from pflatents.tasks.analysis import stats as S
from pflatents.tasks.analysis.prior import alpha_sigma_T, prior_target
from pflatents.tasks.analysis.spectrum import data_spectrum, latent_spectrum, moments_pass, name_direction
from pflatents.tasks.analysis.summary import summarise
from pflatents.tasks.ode.sde import EDMSDE, VESDE, VPSDE

CFG = S.StatsConfig()


def _subspace_data(n=4000, seed=0):
    """6 dims: dim 2 constant, and the other five sum to zero (mean removed over them): rank 4."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6)) * np.array([1.0, 2.0, 1.0, 0.5, 1.5, 1.0])
    live = [0, 1, 3, 4, 5]
    x[:, live] -= x[:, live].mean(1, keepdims=True)
    x[:, 2] = 0.25
    return x


def test_moments_pass_matches_numpy_and_is_chunk_invariant():
    import dask.array as da

    x = _subspace_data()
    for chunks in (4000, 999):
        n, mean, cov = moments_pass(da.from_array(x, chunks=(chunks, 6)), scheduler="sync")
        assert n == 4000
        np.testing.assert_allclose(mean, x.mean(0), atol=1e-12)
        np.testing.assert_allclose(cov, np.cov(x.T), atol=1e-12)


def test_rank_and_degenerate_directions_of_data_on_a_known_subspace():
    x = _subspace_data()
    spec = data_spectrum(len(x), x.mean(0), np.cov(x.T))
    assert spec.rank == 4 and spec.degenerate.shape[1] == 2
    assert spec.constant_dims.tolist() == [2] and not spec.axis_aligned
    ones = np.array([1, 1, 0, 1, 1, 1]) / np.sqrt(5)
    assert abs(spec.degenerate[:, 1] @ ones) == pytest.approx(1.0, abs=1e-9)
    assert name_direction(spec.degenerate[:, 0]) == "dim 2"
    assert name_direction(spec.degenerate[:, 1], np.array([0, 1, 3, 4, 5])).startswith("the all-ones direction over 5")
    b = spec.basis
    np.testing.assert_allclose(b.T @ b, np.eye(4), atol=1e-12)
    np.testing.assert_allclose(b.T @ spec.degenerate, 0, atol=1e-12)
    assert len(set(spec.coord_dims.tolist())) == 4 and 2 not in spec.coord_dims
    assert all(abs(b[j, k]) > 0.8 for k, j in enumerate(spec.coord_dims))  # coordinate k stays near dim j


def test_constant_dims_alone_keep_the_dims_as_coordinates():
    x = np.random.default_rng(1).normal(size=(500, 6))
    x[:, [0, 3]] = -1.0
    x[:, 5] = -1.0
    x[[7, 70, 300], 5] = -1.0 + 2 / 16  # off the background by one step in 3 of 500 samples
    spec = data_spectrum(len(x), x.mean(0), np.cov(x.T), quantization=17)
    assert spec.floor == pytest.approx((2 / 16) ** 2 / 12)  # the quantisation noise's variance
    assert spec.axis_aligned and spec.rank == 3 and spec.coord_dims.tolist() == [1, 2, 4]
    assert spec.constant_dims.tolist() == [0, 3, 5]
    np.testing.assert_array_equal(spec.basis, np.eye(6)[:, [1, 2, 4]])
    assert data_spectrum(len(x), x.mean(0), np.cov(x.T)).rank == 4  # not quantised: dim 5 has variance


@pytest.mark.slow  # ~8-19 s: outside make test-fast's ~2 min, still in make test
def test_patch_like_case_attributes_total_correlation_to_the_degenerate_direction():
    """Mean-removed 64-dim data span 63 dims; latents with variance 0.27 along the all-ones direction."""
    d, n = 64, 20000
    rng = np.random.default_rng(2)
    x = rng.normal(size=(3000, d))
    x -= x.mean(1, keepdims=True)
    spec = data_spectrum(len(x), x.mean(0), np.cov(x.T))
    assert spec.rank == 63 and spec.degenerate.shape[1] == 1
    u = np.ones(d) / 8.0
    z = rng.normal(size=(n, d))
    z += (np.sqrt(0.27) - 1) * np.outer(z @ u, u)       # variance 0.27 along u, 1 elsewhere
    raw = summarise(S.compute_stats(z, CFG, scheduler="sync"), [], CFG)["independence"]
    assert raw["gaussian_total_correlation"] > 0.25 and raw["bartlett_rejected"]
    target = prior_target(spec, VPSDE())
    res = S.compute_stats(z, CFG, scheduler="sync", shift=target.shift, matrix=target.matrix)
    ind = summarise(res, [], CFG)["independence"]
    assert res["d"] == 63 and not ind["bartlett_rejected"]
    assert ind["gaussian_total_correlation"] < 5 * ind["gaussian_total_correlation_null_mean"]
    sp = latent_spectrum(spec, res["full_mean"], res["full_cov"], target.degenerate_var)
    assert sp["latent"]["eigenvalues_min"] == pytest.approx(0.27, rel=0.05)
    top = sp["total_correlation_top"][0]
    assert top["cos_with_degenerate_data_direction"] > 0.99 and top["direction"].startswith("the all-ones")
    assert top["contribution"] == pytest.approx(-0.5 * np.log(0.27 / (1 - 0.73 / 64)), rel=0.05)
    assert sp["latent"]["gaussian_total_correlation_all_dims"] == pytest.approx(raw["gaussian_total_correlation"])
    assert top["contribution"] > sp["latent"]["gaussian_total_correlation_all_dims"]  # the rest adds up < 0
    part = sp["latent"]["degenerate_part"][0]
    assert part["latent_variance"] == pytest.approx(0.27, rel=0.05) and part["prior_variance"] == pytest.approx(1, abs=1e-3)
    assert sp["data"]["rank"] == 63 and sp["data"]["n_degenerate"] == 1


@pytest.mark.parametrize("sde", [VPSDE(), VESDE(), EDMSDE()], ids=["vp", "ve", "edm"])
def test_exact_latents_pass_the_p_T_test_at_a_million_where_N01_fails(sde):
    """Latents drawn from p_T = N(alpha_T mu, alpha_T^2 Sigma + sigma_T^2 I) of data with mean mu."""
    d, n = 4, 1_000_000
    rng = np.random.default_rng(3)
    a = rng.normal(size=(d, d))
    cov = a @ a.T / d + 0.2 * np.eye(d)
    a_t, s_t = alpha_sigma_T(sde)
    mu = np.array([1.0, -1.0, 0.5, 0.0]) * 0.02 / (a_t / sde.prior_std)  # p_T mean shift 0.02 (prior-std units)
    spec = data_spectrum(10_000, mu, cov)
    target = prior_target(spec, sde)
    p_cov = (a_t ** 2 * cov + s_t ** 2 * np.eye(d)) / sde.prior_std ** 2
    z = target.shift + rng.normal(size=(n, d)) @ np.linalg.cholesky(p_cov).T
    plain = summarise(S.compute_stats(z, CFG), [], CFG)["normality"]
    assert plain["n_dims_failing"] >= 2 and plain["n_dims_failing_by_test"]["mean"] >= 2
    exact = summarise(S.compute_stats(z, CFG, shift=target.shift, matrix=target.matrix), [], CFG)["normality"]
    assert exact["n_dims_failing"] == 0
    n_star = target.info["n_indistinguishable_from_standard_normal"]
    assert 1e4 < n_star < n and target.info["max_abs_mean_shift"] == pytest.approx(0.02)


def test_raw_covariance_comes_back_from_a_square_transform_and_is_kept_beside_a_projection():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(3000, 5)) @ rng.normal(size=(5, 5)) + 1.0
    square, proj = rng.normal(size=(5, 5)), np.linalg.qr(rng.normal(size=(5, 3)))[0]
    for m in (square, proj):
        res = S.compute_stats(x, CFG, scheduler="sync", shift=x.mean(0) * 0.5, matrix=m)
        np.testing.assert_allclose(res["full_cov"], np.cov(x.T), rtol=1e-8, atol=1e-10)
        np.testing.assert_allclose(res["full_mean"], x.mean(0), rtol=1e-10)
