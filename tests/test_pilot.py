"""The --latent-tol pilot (pflatents.tasks.ode.pilot) on a case with a known answer, and its pinning.

Gaussian data under VP: the exact flow map (tests/problems.py, closed form) says what each chosen
setting's latent error really is, independently of the pilot's own reference run.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from problems import gaussian, t64
from pflatents.tasks.errors import SolverError
from pflatents.tasks.ode.pfode import encode
from pflatents.tasks.ode.pilot import candidates, choose, describe, rhs_noise
from pflatents.tasks.ode.sde import VPSDE

T_EPS = 1e-3


@pytest.fixture(scope="module")
def case():
    g = gaussian(d=4, seed=0, lam_lo=1e-3, lam_hi=1.0)
    sde = VPSDE()
    return g, sde, g.model(sde), g.sample(64, seed=1)


@pytest.mark.parametrize("target", [1e-2, 1e-5])
def test_pilot_choice_meets_its_target_against_the_exact_map(case, target):
    g, sde, m, x0 = case
    res = choose(m, sde, t64(x0), target, candidates(T_EPS), dtype=torch.float64)
    assert res.met and res.choice is not None
    z = encode(m, sde, t64(x0), res.choice).x.numpy()
    err = np.abs(z - g.flow(sde, x0, T_EPS, sde.T)).max(axis=1)
    assert np.quantile(err, 0.99) <= target
    # the cheapest that met it: every cheaper candidate missed the target in the pilot
    chosen = next(r for r in res.rows if r["setting"] == res.choice.to_dict())
    assert all(r["p99"] > target for r in res.rows if r["nfe_mean"] < chosen["nfe_mean"])
    assert "chose " in describe({**res.to_dict(), "noise": 0.0})


def test_looser_target_is_cheaper(case):
    _, sde, m, x0 = case
    loose = choose(m, sde, t64(x0), 1e-2, candidates(T_EPS), dtype=torch.float64)
    tight = choose(m, sde, t64(x0), 1e-5, candidates(T_EPS), dtype=torch.float64)
    nfe = lambda res: next(r["nfe_mean"] for r in res.rows if r["setting"] == res.choice.to_dict())  # noqa: E731
    assert nfe(loose) < nfe(tight)


def test_unreachable_target_says_so_and_keeps_the_most_accurate(case):
    _, sde, m, x0 = case
    res = choose(m, sde, t64(x0), 1e-12, candidates(T_EPS)[:3], dtype=torch.float32)
    assert not res.met
    assert res.choice.rtol == min(c.rtol for c in candidates(T_EPS)[:3])  # the most accurate of the three
    assert "NOT met" in describe(res.to_dict())


def test_bad_target(case):
    _, sde, m, x0 = case
    with pytest.raises(SolverError, match="target"):
        choose(m, sde, t64(x0), 0.0, candidates(T_EPS))


def test_rhs_noise_of_float32_against_float64(case):
    _, sde, m, x0 = case
    n32 = rhs_noise(m, m, sde, t64(x0), T_EPS, torch.float32)
    assert 1e-8 < n32 < 1e-3  # float32 rounding, amplified by the score's Lipschitz constant (~1/sigma^2)
    assert rhs_noise(m, m, sde, t64(x0), T_EPS, torch.float64) == 0.0


# ---- pinned in the store config through the job settings ------------------------------------------

@pytest.fixture()
def job_files(tmp_path, case):
    g, _, _, _ = case
    data = tmp_path / "x.npy"
    np.save(data, g.sample(300, seed=5).astype(np.float32))
    model = tmp_path / "g.json"
    model.write_text(json.dumps({"weights": [1.0], "means": [g.mu.tolist()], "covariances": [g.cov.tolist()]}))
    return str(data), f"gmm:{model}", str(tmp_path / "out.zarr")


def _prepare(data, model, out, **kw):
    from pflatents.flows.coordinator import Job, prepare

    return prepare(Job(data=data, model=model, out=out, t_eps=T_EPS, **kw).resolved())


def test_latent_tol_is_pinned_reused_and_refused_on_mismatch(job_files, monkeypatch):
    from pflatents.flows.coordinator import make_store
    from pflatents.storage.errors import ConfigMismatchError
    import pflatents.tasks.ode.pilot as pilot_mod

    data, model, out = job_files
    p = _prepare(data, model, out, latent_tol=1e-3)
    rec = p.cfg.pilot
    assert rec["target"] == 1e-3 and rec["met"] and rec["n"] == 128 and rec["choice"] == p.cfg.solver
    assert {"p50", "p99", "max", "nfe_mean"} <= set(rec["candidates"][0])
    make_store(p)
    # the same target on the existing store reuses the pinned choice: no pilot runs
    monkeypatch.setattr(pilot_mod, "latent_pilot", lambda *a, **k: pytest.fail("the pilot ran again"))
    again = _prepare(data, model, out, latent_tol=1e-3)
    assert again.cfg == p.cfg
    make_store(again)
    # another target is another config: refused, naming the pilot
    monkeypatch.undo()
    other = _prepare(data, model, out, latent_tol=1e-5)
    with pytest.raises(ConfigMismatchError, match="pilot"):
        make_store(other)


def test_explicit_solver_flags_win_over_the_pilot(job_files, monkeypatch):
    import pflatents.tasks.ode.pilot as pilot_mod

    data, model, out = job_files
    monkeypatch.setattr(pilot_mod, "latent_pilot", lambda *a, **k: pytest.fail("the pilot ran"))
    p = _prepare(data, model, out, latent_tol=1e-3, rtol=1e-6, atol=1e-6)
    assert p.cfg.solver["rtol"] == 1e-6 and "explicit --atol, --rtol" in p.cfg.pilot["skipped"]
    assert "no pilot" in describe(p.cfg.pilot)
