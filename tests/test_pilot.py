"""The --latent-tol pilot (pflatents.tasks.ode.pilot) on cases with a known answer, and the pilot as a
step of the job (its Prefect task, pinned result, resume, status).

Gaussian data under VP: the exact flow map (tests/problems.py, closed form) says what each chosen
setting's latent error really is, on samples the pilot never saw, independently of the pilot's own
float64 reference run.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from problems import gaussian, t64
from pflatents.tasks.data.sources import ArraySource
from pflatents.tasks.errors import SolverError
from pflatents.tasks.ode.pfode import SolverConfig, encode
from pflatents.tasks.ode.pilot import (MARGIN, STEP_LADDER, curve_table, describe, families, latent_pilot,
                                       pilot_subsets, rhs_noise, search)
from pflatents.tasks.ode.sde import VPSDE

T_EPS = 1e-3
BASE = SolverConfig("dopri5", t_eps=T_EPS, time_var="t", control="latent")


@pytest.fixture(scope="module")
def case():
    g = gaussian(d=4, seed=0, lam_lo=1e-3, lam_hi=1.0)
    sde = VPSDE()
    return g, sde, g.model(sde)


def _pilot(g, sde, m, target, dtype="float64"):
    src = ArraySource("array:gauss", g.sample(1000, seed=1))
    fit, held = pilot_subsets(src)
    return latent_pilot(m, m, sde, fit, held, BASE, dtype, target)


def _true_p99(g, sde, m, cfg, n=512, seed=7):
    """The p99 of the exact latent error on n fresh samples (neither fit nor held-out)."""
    x = g.sample(n, seed=seed)
    z = encode(m, sde, t64(x), cfg).x.numpy()
    return float(np.quantile(np.abs(z - g.flow(sde, x, T_EPS, sde.T)).max(axis=1), 0.99))


@pytest.mark.slow
@pytest.mark.parametrize("target", [1e-3, 1e-4])
def test_pilot_choice_meets_its_target_on_unseen_samples_and_is_not_wastefully_accurate(case, target):
    g, sde, m = case
    choice, rec = _pilot(g, sde, m, target)
    assert rec["met"] and rec["state"] == "done" and rec["n_fit"] == 128 and rec["n_held"] == 128
    true = _true_p99(g, sde, m, choice)
    # between E/4 and E against the exact map on 512 samples the pilot never saw (not E/13 as before)
    assert target / 4 <= true <= target, (choice, true)
    chosen = next(r for r in rec["curve"] if r.get("chosen"))
    assert chosen["setting"] == choice.to_dict() and chosen["held"]["p99"] <= target
    # every solver and grid of the product was tried; the ladders are fine (steps +-1, 1/32 decade)
    assert {r["family"] for r in rec["curve"]} >= {"dopri5", "rk4 logsnr", "rk4 edm", "heun logsnr",
                                                    "euler logsnr", "dpmpp2m logsnr"}
    if not rec["stepped_up"]:
        # the cheapest of its family meeting target / MARGIN on the fit set: cheaper ones of it missed
        same = [r for r in rec["curve"] if r["family"] == chosen["family"] and r["nfe_mean"] < chosen["nfe_mean"]]
        assert same and all(r["fit"]["p99"] > target / MARGIN for r in same)
        assert chosen["fit"]["p99"] <= target / MARGIN
    assert "chose " in describe(rec) and "held-out p99" in describe(rec)


@pytest.mark.slow
def test_looser_target_is_cheaper(case):
    g, sde, m = case
    _, loose = _pilot(g, sde, m, 1e-2)
    _, tight = _pilot(g, sde, m, 1e-5)
    nfe = lambda rec: next(r["nfe_mean"] for r in rec["curve"] if r.get("chosen"))  # noqa: E731
    assert nfe(loose) < nfe(tight)


def test_held_out_check_steps_up_when_the_fit_set_was_easy(case):
    """Fit on samples near the mean (small errors), check on samples far out (larger errors): the
    held-out p99 exceeds the target, so the pilot steps to more accurate rungs until it meets it."""
    g, sde, m = case
    x = g.sample(4000, seed=3)
    r = np.linalg.norm(np.linalg.solve(np.linalg.cholesky(g.cov), (x - g.mu).T), axis=0)
    near, far = x[np.argsort(r)[:128]], x[np.argsort(r)[-128:]]
    target = 1e-4
    fams = [f for f in families(BASE) if f.label == "rk4 logsnr"]
    res = search(m, sde, t64(near), t64(far), target, fams, torch.float64)
    chosen = next(r for r in res.curve if r.get("chosen"))
    assert res.stepped_up >= 1 and "stepped up" in res.note
    assert chosen["held"]["p99"] <= target and res.met
    first = [r for r in res.curve if "held" in r and r["held"]["p99"] > target]
    assert first  # the fit set's choice did miss on the held-out set
    assert _true_p99(g, sde, m, res.choice, seed=9) <= 2 * target


def test_unreachable_target_says_so_and_keeps_the_most_accurate(case):
    g, sde, m = case
    fams = [f for f in families(BASE) if f.label == "euler logsnr"]
    x = t64(g.sample(16, seed=1))
    res = search(m, sde, x[:8], x[8:], 1e-9, fams, torch.float32)
    assert not res.met and "NOT met" in describe({**res.to_dict(), "seed": 0, "noise": 0.0})
    best = min(res.curve, key=lambda r: r["fit"]["p99"])
    assert res.choice.to_dict() == best["setting"] and res.stepped_up == 0  # the most accurate it measured
    assert best["fit"]["p99"] > 1e-9 and "most accurate" in res.note


def test_bad_target(case):
    g, sde, m = case
    x = t64(g.sample(8, seed=1))
    with pytest.raises(SolverError, match="target"):
        search(m, sde, x, None, 0.0, families(BASE))


def test_subsets_are_disjoint_and_seeded():
    src = ArraySource("array:idx", np.arange(1000, dtype=np.float32)[:, None] * np.ones((1, 2), np.float32))
    (xf, _), (xh, _) = pilot_subsets(src)
    assert len(xf) == len(xh) == 128 and not set(xf[:, 0]) & set(xh[:, 0])
    (xf2, _), _ = pilot_subsets(src)
    np.testing.assert_array_equal(xf, xf2)
    small = ArraySource("array:small", np.ones((5, 2), np.float32))
    (a, _), (b, _) = pilot_subsets(small)
    assert len(a) == 3 and len(b) == 2
    assert STEP_LADDER[:12] == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]
    assert all(1.0 < b / a <= 2.0 for a, b in zip(STEP_LADDER, STEP_LADDER[1:]))


def test_rhs_noise_of_float32_against_float64(case):
    g, sde, m = case
    x0 = t64(g.sample(64, seed=1))
    n32 = rhs_noise(m, m, sde, x0, T_EPS, torch.float32)
    assert 1e-8 < n32 < 1e-3  # float32 rounding, amplified by the score's Lipschitz constant (~1/sigma^2)
    assert rhs_noise(m, m, sde, x0, T_EPS, torch.float64) == 0.0


# ---- pinned in the store config: built pending, run by the job's pilot step ---------------------

@pytest.fixture()
def job_files(tmp_path, case):
    g, _, _ = case
    data = tmp_path / "x.npy"
    np.save(data, g.sample(600, seed=5).astype(np.float32))
    model = tmp_path / "g.json"
    model.write_text(json.dumps({"weights": [1.0], "means": [g.mu.tolist()], "covariances": [g.cov.tolist()]}))
    return str(data), f"gmm:{model}", str(tmp_path / "out.zarr")


def _prepare(data, model, out, **kw):
    from pflatents.flows.coordinator import Job, prepare

    return prepare(Job(data=data, model=model, out=out, t_eps=T_EPS, **kw).resolved())


def test_building_the_settings_runs_no_pilot_and_the_pilot_step_pins_its_choice(job_files, monkeypatch):
    from pflatents.flows.coordinator import make_store
    from pflatents.storage import LatentStore
    from pflatents.storage.errors import ConfigMismatchError
    from pflatents.tasks.wrappers.pilot import pin_pilot
    import pflatents.tasks.ode.pilot as pilot_mod

    data, model, out = job_files
    monkeypatch.setattr(pilot_mod, "latent_pilot", lambda *a, **k: pytest.fail("building the settings ran the pilot"))
    p = _prepare(data, model, out, latent_tol=1e-3)
    assert p.cfg.pilot == {"target": 1e-3, "state": "pending"}
    make_store(p)
    assert _prepare(data, model, out, latent_tol=1e-3).cfg == p.cfg  # still pending: the same config
    monkeypatch.undo()
    rec = pin_pilot(out)
    pinned = LatentStore.open(out, mode="r").config
    assert pinned["pilot"]["state"] == "done" and pinned["pilot"]["met"]
    assert pinned["solver"] == pinned["pilot"]["choice"] == rec["choice"]
    # the same target on the existing store reuses the pinned choice: no pilot runs
    monkeypatch.setattr(pilot_mod, "latent_pilot", lambda *a, **k: pytest.fail("the pilot ran again"))
    again = _prepare(data, model, out, latent_tol=1e-3)
    assert again.cfg.to_dict() == pinned
    make_store(again)
    assert pin_pilot(out) == pinned["pilot"]  # not pending: nothing runs
    # another target is another config: refused, naming the pilot
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


def test_first_pilot_records_still_read():
    """Stores pinned by the first pilot (one subset, ``candidates``) describe as before."""
    old = {"target": 1e-3, "met": True, "n": 128, "choice": {"name": "rk4", "t_eps": 1e-4, "steps": 64, "grid": "logsnr"},
           "candidates": [{"setting": {"name": "rk4", "t_eps": 1e-4, "steps": 64, "grid": "logsnr"}, "nfe_mean": 256.0,
                           "p50": 1e-5, "p99": 7e-5, "max": 9e-5, "failed": 0}]}
    assert "chose rk4 64 steps" in describe(old) and curve_table(old) == []


def test_noise_floor_of_each_family_matches_the_form_it_steps_on(case):
    """adams4 and dpm23 step on the DDIM form (eps_hat on y = x/alpha): their floor is eps_hat's noise,
    not dx/dt's (which near T is larger: the drift and the score term nearly cancel)."""
    g, sde, m = case
    x0 = t64(g.sample(64, seed=1))
    n_x = rhs_noise(m, m, sde, x0, T_EPS, torch.float32)
    n_y = rhs_noise(m, m, sde, x0, T_EPS, torch.float32, ddim=True)
    assert 0 < n_y < n_x
    floors = {f.base.name: f.base.noise for f in families(SolverConfig("dopri5", t_eps=T_EPS), n_x, n_y)
              if f.adaptive and f.base.noise > 0}
    assert floors["adams4"] == floors["dpm23"] == n_y
    assert floors["dopri5"] == n_x


def test_weight_exponents_are_families_of_latent_control_only(case):
    """adams4 under latent control comes with the weight exponents 1.25 and 1.75 besides 1 (each a family
    of its own, with and without the floor); under local control there is none. A pilot restricted to the
    exponent families chooses one of them, pins it, describes it, and the choice meets the target on
    samples it never saw (the closed form)."""
    labels = {f.label: f.base for f in families(BASE, 1e-6, 1e-7)}
    assert labels["adams4 weight^1.75"].weight_power == 1.75 and labels["adams4 weight^1.25"].weight_power == 1.25
    assert labels["adams4 noise floor weight^1.75"].noise == 1e-7 and labels["adams4"].weight_power == 1.0
    # adams5 (cheaper than adams4 at tight targets on learned models) comes with the same exponents
    assert labels["adams5 weight^1.25"].weight_power == 1.25 and labels["adams5 noise floor"].noise == 1e-7
    assert labels["adams5"].name == "adams5" and labels["dopri5 noise floor"].noise == 1e-6  # the floor of x's F
    assert not [f for f in families(SolverConfig("dopri5", t_eps=T_EPS)) if f.base.weight_power != 1]
    g, sde, m = case
    src = ArraySource("array:gauss", g.sample(1000, seed=1))
    fit, held = pilot_subsets(src)
    fams = [f for f in families(BASE) if f.label.startswith("adams4 weight^")]
    res = search(m, sde, t64(fit[0]), t64(held[0]), 1e-3, fams, torch.float64)
    rec = res.to_dict()
    assert res.choice.weight_power in (1.25, 1.75) and rec["choice"]["weight_power"] == res.choice.weight_power
    assert f"weight^{res.choice.weight_power:g}" in describe(rec)
    assert _true_p99(g, sde, m, res.choice) <= 1e-3


def test_the_jobs_own_solver_is_searched_first():
    """The base's solver opens the adaptive families (it sets the NFE budget that stops the costlier ones
    early); the rest keep the product's order, fixed-step solvers after them."""
    for name in ("adams4", "dopri5", "dpm23"):
        fams = families(SolverConfig(name, t_eps=T_EPS, control="latent"))
        assert fams[0].base.name == name and fams[0].label == name
        adaptive = [f.base.name for f in fams if f.adaptive]
        assert adaptive == sorted(adaptive, key=lambda n: n != name) and not any(f.adaptive for f in fams[len(adaptive):])
