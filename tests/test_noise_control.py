"""Error control that knows the right-hand side's noise floor, and latent-unit control (pflatents.tasks.ode.solvers).

Problem with an exact answer: dy/ds = -cos(s) y, y(s) = y0 exp(-sin(s)), with deterministic
"rounding" noise injected into F: F (1 + delta xi(y, s)), xi a high-frequency function of the state
and time (like float32 rounding it depends on the inputs only, so per-sample results stay
independent of the batch).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from problems import gaussian, t64
from pflatents.tasks.errors import SolverError
from pflatents.tasks.ode import solvers as S
from pflatents.tasks.ode.pfode import SolverConfig, encode
from pflatents.tasks.ode.sde import VPSDE

F64 = torch.float64
DELTA = 1e-6
SPAN = (0.0, 6.0)


def noisy_rhs(delta: float):
    def F(y: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        f = -torch.cos(s)[:, None] * y
        xi = torch.sin(1e7 * y + 3e5 * s[:, None])  # deterministic, rapidly varying: like rounding noise
        return f * (1 + delta * xi)
    return F


def exact(y0: torch.Tensor) -> torch.Tensor:
    return y0 * math.exp(-math.sin(SPAN[1]))


@pytest.fixture(scope="module")
def y0():
    return t64(np.random.default_rng(0).uniform(0.5, 2.0, (8, 4)))


def run(y0, tol, noise, delta=DELTA):
    ctl = S.Control(tol, tol, noise=noise, max_steps=20_000)
    return S.solve_adaptive(noisy_rhs(delta), y0, *SPAN, ctl)


@pytest.mark.slow
def test_controller_without_the_floor_chases_the_noise(y0):
    n = [float(run(y0, tol, 0.0).nfe.double().mean()) for tol in (1e-8, 1e-10, 1e-12)]
    assert n[2] > 4 * n[0], n  # steps grow without bound as the tolerance falls below the noise


@pytest.mark.slow
def test_noise_floor_keeps_nfe_bounded_and_error_at_the_floor(y0):
    ref = exact(y0)
    clean = run(y0, 1e-9, 0.0, delta=0.0)  # what truncation alone needs for a tolerance at the floor
    nfe, err = [], []
    for tol in (1e-8, 1e-10, 1e-12, 1e-14):
        r = run(y0, tol, DELTA)
        assert bool(r.ok.all())
        nfe.append(float(r.nfe.double().mean()))
        err.append(float((r.y - ref).abs().max() / ref.abs().max()))
    assert nfe[3] <= 1.1 * nfe[2], nfe  # bounded: below the floor the tolerance no longer sets the step
    assert nfe[3] <= 1.5 * float(clean.nfe.double().mean()), (nfe, clean.nfe)
    chased = float(run(y0, 1e-14, 0.0).nfe.double().mean())
    assert chased > 3 * nfe[3], (chased, nfe)
    assert max(err) <= 10 * DELTA, err  # at the noise floor, not above it


def test_noise_floor_keeps_samples_independent_of_their_batch(y0):
    whole = run(y0, 1e-12, DELTA)
    for i in (0, 5):
        alone = run(y0[i:i + 1], 1e-12, DELTA)
        assert torch.equal(alone.y[0], whole.y[i]) and int(alone.nfe[0]) == int(whole.nfe[i])


def test_noise_must_be_a_non_negative_number():
    with pytest.raises(SolverError, match="noise"):
        S.Control(1e-6, 1e-6, noise=-1.0)
    with pytest.raises(SolverError, match="noise"):
        SolverConfig("dopri5", noise=float("nan"))
    with pytest.raises(SolverError, match="control"):
        SolverConfig("dopri5", control="global")


def test_latent_control_meets_a_latent_error_target_at_small_t_eps():
    """Nearly degenerate Gaussian data: an error made near t_eps grows like sigma(T)/sigma(t) on encode.
    Latent-unit control keeps the latent error near the tolerance where local control misses it by far."""
    g = gaussian(d=4, seed=0, lam_lo=1e-6, lam_hi=1.0)
    sde = VPSDE()
    m = g.model(sde)
    x0 = g.sample(32, seed=1)
    ref = g.flow(sde, x0, 1e-5, sde.T)
    errs = {}
    for control in ("local", "latent"):
        r = encode(m, sde, t64(x0), SolverConfig("dopri5", rtol=1e-4, atol=1e-4, t_eps=1e-5, control=control))
        errs[control] = float(np.abs(r.x.numpy() - ref).max())
    assert errs["latent"] <= 1e-4 < errs["local"], errs


def test_unused_extensions_leave_the_pinned_settings_unchanged():
    d = SolverConfig("dopri5", control="local").to_dict()  # what every config pinned before them meant
    assert "control" not in d and "noise" not in d
    assert "control" not in SolverConfig("dopri5").to_dict()  # the library default stays local
    d = SolverConfig("dopri5", control="latent", noise=1e-5).to_dict()
    assert d["control"] == "latent" and d["noise"] == 1e-5
