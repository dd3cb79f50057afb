"""`pflatents analyze --stability N`: drift of stored latents against a ~10x more accurate re-encode."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pflatents.flows.cli import main
from pflatents.tasks.analysis.reconstruct import exact_gaussian_latents
from pflatents.tasks.analysis.stability import drift, tighter
from pflatents.tasks.ode.pfode import SolverConfig
from pflatents.tasks.ode.sde import VPSDE


def test_tighter_is_about_ten_times_more_accurate_by_construction():
    a = tighter(SolverConfig("dopri5", rtol=1e-5, atol=1e-5, control="latent"))
    assert (a.rtol, a.atol, a.control) == (pytest.approx(1e-7), pytest.approx(1e-7), "latent")
    assert tighter(SolverConfig("rk4", steps=16)).steps == 64


def test_drift_quantiles_target_and_worst():
    index = np.arange(100, 200)
    stored = np.zeros((100, 3))
    again = stored.copy()
    again[7, 2] = 0.5      # the worst sample, in dimension 2
    again[:, 1] += 1e-4    # every sample drifts a little in dimension 1
    d = drift(stored, again, index, target=1e-2)
    assert d["p50"] == pytest.approx(1e-4) and d["max"] == pytest.approx(0.5)
    assert d["worst_samples"][0] == {"row": 107, "drift": 0.5, "dim": 2} and d["worst_dims"][0] == 1
    assert d["meets_target"] and d["target"] == 1e-2  # p99 interpolates towards the one bad sample: 5e-3
    assert not drift(stored, again, index, target=1e-5)["meets_target"]
    again[3] = np.nan
    assert drift(stored, again, index, None)["max"] == np.inf


def _store(tmp_path, bump: float) -> str:
    from test_analyze import craft_store

    x = np.random.default_rng(4).normal(size=(400, 3))
    z = exact_gaussian_latents(x, np.zeros(3), np.eye(3), VPSDE(), 1e-5)  # the identity GMM's exact map
    z[::2] += bump
    return craft_store(tmp_path, x, z.astype(np.float32), shard=200)


@pytest.mark.integration
@pytest.mark.parametrize("bump,meets", [(0.0, True), (1e-2, False)])
def test_analyze_stability_end_to_end(tmp_path, prefect_api, capsys, bump, meets):
    url = _store(tmp_path, bump)
    capsys.readouterr()
    assert main(["analyze", url, "--prior", "0", "--stability", "60", "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    st = s["stability"]
    assert st["n"] == 60 and st["meets_target"] is meets and st["target"] == 1e-3
    assert st["setting"]["steps"] == 40  # the pinned rk4 with 10 steps, x4
    if meets:
        assert st["p99"] < 1e-4
    else:
        assert st["p99"] == pytest.approx(1e-2, rel=0.05) and "MISSES" in s["verdict"]
    assert {"p50", "p99", "max", "target", "meets_target"} <= set(st)
