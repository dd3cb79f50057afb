"""`pflatents analyze` end to end: a real extraction, crafted stores (Laplace oracle, VE, partial), bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import xarray as xr
from scipy import special, stats

from extract_helpers import write_gmm_job
from pflatents.flows.cli import main
from pflatents.tasks.config import JobSettings, build_config
from pflatents.storage import open_or_create
from pflatents.tasks.ode.batches import encode_block
from pflatents.tasks.ode.pfode import SolverConfig
from pflatents.tasks.analysis.reconstruct import exact_gaussian_latents, requantise_exact
from pflatents.tasks.models.scores import GaussianMixtureScore
from pflatents.tasks.ode.sde import VPSDE
from pflatents.tasks.data.sources import open_source

KEYS = ["independence.max_abs_offdiag_corr", "independence.n_pairs_over_threshold",
        "independence.gaussian_total_correlation", "independence.max_abs_offdiag_corr_of_squares",
        "normality.max_abs_mean", "normality.max_abs_var_minus_1", "normality.mean_abs_excess_kurtosis",
        "normality.n_dims_failing", "reconstruction.max_abs_error", "reconstruction.rmse"]


def _get(d: dict, dotted: str):
    for part in dotted.split("."):
        d = d[part]
    return d


def _analyze(args, capsys) -> tuple[int, dict | None, str]:
    capsys.readouterr()
    code = main(["analyze", *args, "--json"])
    out = capsys.readouterr()
    return code, (json.loads(out.out) if code == 0 else None), out.err


def craft_store(tmp, x, z, sde="vp", shard=500, done=None):
    """A store holding the given latents ``z`` of data ``x`` (a K=1 identity GMM pinned as model)."""
    np.save(tmp / "x.npy", x.astype(np.float32))
    d = int(np.prod(x.shape[1:]))
    (tmp / "gmm.json").write_text(json.dumps({"weights": [1.0], "means": [[0.0] * d],
                                              "covariances": [np.eye(d).tolist()]}))
    job = JobSettings(data=str(tmp / "x.npy"), model=f"gmm:{tmp / 'gmm.json'}", out="-", sde=sde, solver="rk4",
                      steps=10)
    cfg = build_config(job, source=open_source(job.data), shard_size=shard, incremental=False)
    url = str(tmp / "crafted.zarr")
    store = open_or_create(url, config=cfg.to_dict(), n_samples=len(x), sample_shape=x.shape[1:], shard_size=shard)
    for sid in range(store.n_shards):
        if done is None or sid in done:
            i0, i1 = store.shard_range(sid)
            store.write_shard(sid, z[i0:i1], np.zeros(i1 - i0, np.int32))
    return url


def test_exact_gaussian_latents_match_a_tight_integration():
    data_mu, a = np.array([1.0, -2.0, 0.5]), np.random.default_rng(0).normal(size=(3, 3))
    cov = a @ a.T + 0.1 * np.eye(3)
    sde = VPSDE()
    model = GaussianMixtureScore([1.0], [data_mu.tolist()], [cov.tolist()], sde)
    x = np.random.default_rng(1).multivariate_normal(data_mu, cov, 20)
    cfg = SolverConfig("dopri5", rtol=1e-9, atol=1e-9, t_eps=1e-5)  # explicit: not the defaults
    z, _, _ = encode_block(model, sde, x, cfg, 20, torch.device("cpu"), "float64")
    np.testing.assert_allclose(exact_gaussian_latents(x, data_mu, cov, sde, cfg.t_eps), z, atol=1e-6)


def test_requantise_exact():
    x = -1 + 2 * np.array([[0, 3, 16], [5, 5, 5]]) / 16
    assert requantise_exact(x, x + 0.03, 17).tolist() == [True, True]
    assert requantise_exact(x, x + np.array([[0, 0.07, 0], [0, 0, 0]]), 17).tolist() == [False, True]


def test_analyze_extracted_store_end_to_end(tmp_path, prefect_api, capsys):
    data, model = write_gmm_job(tmp_path, n=600, dim=4, k=1, seed=3)
    np.save(data, np.load(data).reshape(600, 1, 2, 2))  # image-shaped samples: the report shows grids
    out = str(tmp_path / "s.zarr")
    assert main(["extract", "--data", str(data), "--model", f"gmm:{model}", "--out", out, "--solver", "rk4",
                 "--steps", "20", "--shard-size", "200", "--no-progress"]) == 0
    report = tmp_path / "report"
    code, s, err = _analyze([out, "--reconstruct", "150", "--report", str(report)], capsys)
    assert code == 0, err
    for key in KEYS + ["n_samples", "n_dims", "verdict"]:
        assert _get(s, key) is not None, key
    assert (s["n_samples"], s["n_dims"]) == (600, 4)
    assert s["data"]["rank"] == 4 and s["data"]["n_degenerate"] == 0 and s["prior_target"]["target"].startswith("p_T")
    assert 0.8 < s["latent"]["eigenvalues_min"] <= s["latent"]["eigenvalues_max"] < 1.2
    assert len(s["independence"]["gaussian_total_correlation_top"]) == 3
    rec = s["reconstruction"]
    assert rec["n_checked"] == 150 and rec["max_abs_error"] < 1e-2 and len(rec["worst_samples"]) == 10
    assert rec["encode_max_abs_error"] < 1e-2  # exact encoder of a single Gaussian exists
    ds = xr.open_zarr(out, group="analysis", consolidated=False)
    assert ds["recon_max_abs"].dims == ("sample",) and ds.sizes["sample"] == 150
    idx = ds["sample_index"].values
    assert np.all(np.diff(idx) > 0) and idx.max() < 600
    assert ds["corr"].dims == ("dim_i", "dim_j") and ds["mean"].dims == ("dim",)
    assert ds.attrs["pflatents_analysis"]["summary"]["verdict"] == s["verdict"]
    assert float(ds["recon_max_abs"].max()) == pytest.approx(rec["max_abs_error"], rel=1e-6)
    for name in ("report.html", "report.md", "hist.png", "qq.png", "dependence.png", "qq_summary.png",
                 "round_trip.png", "images_recon.png", "realism.png", "spectrum.png"):
        assert (report / name).stat().st_size > 0, name
    assert "understates" in (report / "report.md").read_text()
    # different settings on the same store: refused, naming the field; --overwrite replaces
    code, _, err = _analyze([out], capsys)
    assert code == 2 and "analysis.reconstruct" in err and "--overwrite" in err and "Traceback" not in err
    code, s2, _ = _analyze([out, "--overwrite"], capsys)
    assert code == 0 and s2["reconstruction"]["max_abs_error"] is None
    # an analysis written before a setting existed (here: no "prior" in its config) is not refused for it
    import zarr

    group = zarr.open_group(out, path="analysis", mode="r+")
    attrs = dict(group.attrs["pflatents_analysis"])
    attrs["config"] = {k: v for k, v in attrs["config"].items() if k != "prior"}
    group.attrs["pflatents_analysis"] = attrs
    code, _, err = _analyze([out], capsys)
    assert code == 0, err
    assert "recon_max_abs" not in xr.open_zarr(out, group="analysis", consolidated=False)


def test_partial_store_ve_prior_std_and_bad_paths(tmp_path, prefect_api, capsys):
    rng = np.random.default_rng(5)
    x = rng.normal(size=(2000, 6))
    url = craft_store(tmp_path, x, 50.0 * rng.normal(size=(2000, 6)), sde="ve", shard=500, done={0, 1, 3})
    code, _, err = _analyze([url], capsys)
    assert code == 2 and "incomplete" in err and "--partial" in err
    code, s, _ = _analyze([url, "--partial"], capsys)
    assert code == 0 and s["n_samples"] == 1500 and "--partial" in s["rows_note"]
    assert s["prior_std"] == 50.0 and s["normality"]["max_abs_var_minus_1"] < 0.15  # standardised
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "file.txt").write_text("x")
    for bad in (tmp_path / "junk", tmp_path / "absent.zarr"):
        code, _, err = _analyze([str(bad)], capsys)
        assert code == 2 and "pflatents store" in err and "Traceback" not in err
    code, _, err = _analyze([url, "--partial", "--overwrite", "--reconstruct", "zero"], capsys)
    assert code == 2 and "--reconstruct" in err


def test_constant_data_dims_are_reported_apart_and_dominate_no_statistic(tmp_path, prefect_api, capsys):
    """Digits-like: two always-blank pixels whose latents are constant (as a trained model gives)."""
    rng = np.random.default_rng(5)
    x = rng.normal(size=(3000, 6))
    x[:, [1, 4]] = -1.0
    z = rng.normal(size=(3000, 6))
    z[:, [1, 4]] = -0.0066  # alpha_T x: the constant's image
    code, s, err = _analyze([craft_store(tmp_path, x, z, shard=1000)], capsys)
    assert code == 0, err
    assert s["data"]["rank"] == 4 and s["data"]["constant_dims"] == [1, 4] and s["n_dims"] == 4
    nm, ind = s["normality"], s["independence"]
    assert nm["n_dims_failing"] == 0 and nm["max_abs_var_minus_1"] < 0.1 and nm["mean_abs_excess_kurtosis"] < 0.3
    assert ind["max_abs_offdiag_corr"] < ind["corr_threshold"] and not ind["bartlett_rejected"]
    part = s["latent"]["degenerate_part"]
    assert [p["direction"] for p in part] == ["dim 1", "dim 4"] and all(p["latent_variance"] < 1e-12 for p in part)
    ds = xr.open_zarr(str(tmp_path / "crafted.zarr"), group="analysis", consolidated=False)
    assert ds["coordinate_dims"].values.tolist() == [0, 2, 3, 5] and ds.sizes["dim"] == 4
    lam = ds["latent_eigenvalues"].values
    assert len(lam) == 6 and lam[0] == pytest.approx(s["latent"]["eigenvalues_min"]) and lam[0] < 1e-12


def test_laplace_oracle_ica_conclusions(tmp_path, prefect_api, capsys):
    """docs/statistics.md: ICA recovers the sources, PF-ODE latents are independent and Gaussian but are not them."""
    rng = np.random.default_rng(11)
    n, d = 20000, 4
    s = rng.laplace(size=(n, d)) / np.sqrt(2)
    a = stats.ortho_group.rvs(d, random_state=12)
    x = s @ a.T
    g = special.ndtri(stats.laplace.cdf(s, scale=1 / np.sqrt(2)))  # exact encoder at T: z = A G(A^T x)
    z = g @ a.T
    np.save(tmp_path / "sources.npy", s)
    url = craft_store(tmp_path, x, z, shard=5000)
    code, out, err = _analyze([url, "--ica", "--sources", str(tmp_path / "sources.npy")], capsys)
    assert code == 0, err
    rows = {r["representation"]: r for r in out["ica"]["table"]}
    raw, ica, lat = rows["raw data"], rows["FastICA(data)"], rows["PF-ODE latents"]
    rot = rows["PF-ODE latents, randomly rotated"]
    assert ica["amari_distance"] < 0.05                                # ICA finds the sources
    assert lat["amari_distance"] > 0.3 and rot["amari_distance"] > 0.3  # latents are not them
    assert raw["max_abs_corr_of_squares"] > 0.1 and "correlation of |z|" in raw["dependence_tests_rejecting"]
    for r in (lat, rot):                                               # ... yet independent, Gaussian
        assert r["dependence_tests_rejecting"] == [] and r["mean_abs_excess_kurtosis"] < r["kurtosis_threshold"]
    assert ica["mean_abs_excess_kurtosis"] > 2 and raw["mean_abs_excess_kurtosis"] > 0.5
    assert out["independence"]["n_pairs_over_threshold"] == 0 and out["normality"]["n_dims_failing"] == 0
    # "can it replace ICA?": the dependence left, in nats. Exact latents and ICA's components leave none
    # (the truth is 0 for both); the rotated Laplace data keep about 0.15 nats
    ans = out["answers"]["independence"]
    left = {r["representation"]: r for r in ans["comparison"]}
    assert left["raw data"]["ci"][0] > 0.05 and left["raw data"]["ci"][0] > left["PF-ODE latents"]["ci"][1]
    for name in ("PF-ODE latents", "FastICA(data)"):
        assert left[name]["ci"][0] <= 0.0 + 1e-12 or left[name]["ci"][0] < 0.03, left[name]
    assert ans["replace_ica"].startswith("about as well") and ans["kind"] == "yes" and ans["level"] == 0.05


def test_flagged_samples_are_left_out(tmp_path, prefect_api, capsys):
    """Samples the solver could not finish (NaN latents, flagged in the store) are cut out of the ranges."""
    from pflatents.storage import LatentStore
    from pflatents.tasks.wrappers.analyze import drop_flagged, usable_rows

    rng = np.random.default_rng(8)
    x, z = rng.normal(size=(1000, 3)), rng.normal(size=(1000, 3))
    url = craft_store(tmp_path, x, z, shard=500, done=set())
    store = LatentStore.open(url, mode="r+")
    status = np.zeros(1000, np.int8)
    status[[0, 5, 6, 999]] = [1, 2, 1, 1]
    for sid in range(2):
        i0, i1 = store.shard_range(sid)
        store.write_shard(sid, z[i0:i1].astype(np.float32), np.zeros(i1 - i0, np.int32), status=status[i0:i1])
    ranges, n = drop_flagged(LatentStore.open(url, mode="r"), [[0, 500], [500, 1000]])
    assert n == 4 and ranges == [[1, 5], [7, 500], [500, 999]] and len(usable_rows(ranges)) == 996
    code, s, err = _analyze([url, "--prior", "0"], capsys)
    assert code == 0, err
    assert s["n_samples"] == 996 and s["n_flagged_excluded"] == 4 and "4 samples the solver flagged" in s["rows_note"]
