"""pflatents.tasks.ode.solvers (and DPM-Solver++ in pflatents.tasks.ode.pfode): tableaux, convergence orders, per-sample control."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from problems import SDES, gaussian, mixed_batch, mixed_difficulty_gmm, random_gmm, t64
from pflatents.tasks.ode import solvers as S
from pflatents.tasks.ode.pfode import SolverConfig, decode, encode, ode_func

F64 = torch.float64


# ---- tableaux -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(S.TABLEAUS))
def test_tableau_consistency_and_quadrature_order(name):
    """Rows sum to c_i; b integrates s^k exactly for k < order (the quadrature order conditions)."""
    tab = S.TABLEAUS[name]
    for ci, ai in zip(tab.c, tab.a):
        assert sum(ai) == pytest.approx(ci, abs=1e-14)
    for k in range(tab.order):
        assert sum(bj * cj**k for bj, cj in zip(tab.b, tab.c)) == pytest.approx(1 / (k + 1), abs=1e-14)
    # the embedded weights also integrate s^k below their own order: dopri5's 4th-order, DOP853's
    # 5th- and 3rd-order estimates
    for e, order in ((tab.e, {"dopri5": 4, "dop853": 5}.get(name)), (tab.e3, 3)):
        if e is not None:
            for k in range(order):
                assert sum(ej * cj**k for ej, cj in zip(e, tab.c)) == pytest.approx(0.0, abs=1e-14)


@pytest.mark.parametrize("name", list(S.TABLEAUS))
def test_fixed_step_order_on_scalar_ode(name):
    """dy/ds = cos(s) y, y = y0 exp(sin s): error ratio on doubling the steps is 2^order."""
    tab = S.TABLEAUS[name]
    F = lambda y, s: torch.cos(s)[:, None] * y  # noqa: E731
    y0 = torch.tensor([[1.0], [-2.0]], dtype=F64)
    exact = y0 * math.exp(math.sin(3.0))
    n = {1: 256, 2: 64, 4: 16, 5: 8, 8: 8}[tab.order]
    err = [(S.solve_fixed(F, y0, torch.linspace(0.0, 3.0, k + 1, dtype=F64), tab).y - exact).abs().max().item()
           for k in (n, 2 * n)]
    assert math.log2(err[0] / err[1]) == pytest.approx(tab.order, abs=0.3)


# ---- convergence order on the Gaussian PF-ODE (exact flow map) --------------------------------------

# (sde, solver, direction) -> n: the ratio err(n)/err(2n) is measured in the asymptotic regime.
# VE is used for float32 because its s-time ODE has a monotone coefficient (clean asymptotics at
# small n, above float32 round-off); VP decode passes through error sign changes, so it needs more
# steps and only float64 reaches its asymptotic regime before round-off.
STEPS = {
    "ve": {"euler": (128, 128), "heun": (64, 64), "rk4": (32, 16), "dpmpp2m": (32, 32)},
    "vp": {"euler": (64, 64), "heun": (128, 128), "rk4": (128, 128), "dpmpp2m": (64, 64)},
}
ORDER = {"euler": 1, "heun": 2, "rk4": 4, "dpmpp2m": 2}
CASES = [("ve", torch.float32), ("ve", F64), ("vp", F64)]


@pytest.fixture(scope="module")
def order_problem():
    g = gaussian(d=4, seed=0, lam_lo=0.02, lam_hi=0.3)  # eigenvalues away from VP's fixed point lam = 1
    return g, g.sample(8, seed=1), np.random.default_rng(3).standard_normal((8, 4))


@pytest.mark.parametrize("direction", ["encode", "decode"])
@pytest.mark.parametrize("sde_name, dtype", CASES, ids=["ve-f32", "ve-f64", "vp-f64"])
@pytest.mark.parametrize("solver", list(ORDER))
def test_convergence_order_on_gaussian(order_problem, solver, sde_name, dtype, direction):
    g, x0, z = order_problem
    sde = SDES[sde_name]()
    m, t_eps = g.model(sde), 1e-5
    start = x0 if direction == "encode" else z * sde.prior_std
    t0, t1 = (t_eps, sde.T) if direction == "encode" else (sde.T, t_eps)
    exact = g.flow(sde, start, t0, t1)
    n = STEPS[sde_name][solver][direction == "decode"]
    errs = []
    for steps in (n, 2 * n):
        cfg = SolverConfig(solver, steps=steps, grid="logsnr", t_eps=t_eps)
        fn = encode if direction == "encode" else decode
        res = fn(m, sde, torch.as_tensor(start, dtype=dtype), cfg)
        assert res.x.dtype == dtype and bool(res.ok.all())
        assert res.nfe.tolist() == [steps * (S.TABLEAUS[solver].stages if solver in S.TABLEAUS else 1)] * 8
        errs.append(np.abs(res.x.double().numpy() - exact).max())
    assert math.log2(errs[0] / errs[1]) == pytest.approx(ORDER[solver], abs=0.3), errs


# ---- per-sample adaptive control (dopri5) ----------------------------------------------------------

class CountingScore:
    """Wraps a score model and counts the rows (samples) it is evaluated on."""

    def __init__(self, model):
        self.model, self.rows, self.calls = model, 0, 0

    def __call__(self, x, t):
        self.rows += x.shape[0]
        self.calls += 1
        return self.model(x, t)


TIGHT = SolverConfig("dopri5", rtol=1e-6, atol=1e-6, t_eps=1e-5)


@pytest.fixture(scope="module")
def mixed():
    gm = mixed_difficulty_gmm(d=4, seed=0)
    return gm, mixed_batch(gm, 512, seed=1)


@pytest.fixture(scope="module", params=["vp", "ve"])
def batch_run(request, mixed):
    gm, x = mixed
    sde = SDES[request.param]()
    counting = CountingScore(gm.model(sde))
    return sde, gm.model(sde), x, encode(counting, sde, t64(x), TIGHT), counting


def test_batch_of_512_all_ok_and_nfe_differ(batch_run):
    _, _, _, res, _ = batch_run
    assert bool(res.ok.all())
    nfe = res.nfe
    assert len(torch.unique(nfe)) >= 5 and nfe.max() >= 1.3 * nfe.min()  # per-sample step sizes


def test_sample_alone_equals_sample_in_batch(batch_run):
    sde, m, x, res, _ = batch_run
    picks = sorted({0, 1, 100, 300, 480, 511, int(res.nfe.argmax()), int(res.nfe.argmin())})
    for i in picks:  # includes tight-component, wide-component and far-tail samples
        alone = encode(m, sde, t64(x[i : i + 1]), TIGHT)
        assert alone.nfe.item() == res.nfe[i].item(), i
        torch.testing.assert_close(alone.x[0], res.x[i], rtol=1e-9, atol=1e-9 * sde.prior_std)


def test_finished_samples_stop_costing_evaluations(batch_run):
    _, _, x, res, counting = batch_run
    assert counting.rows == int(res.nfe.sum())  # every row evaluated is charged to its own sample
    assert counting.rows < 0.9 * len(x) * int(res.nfe.max())


def test_step_limit_marks_only_the_samples_that_need_more_steps(mixed):
    gm, x = mixed
    sde = SDES["vp"]()
    F = ode_func(gm.model(sde), sde, (4,))
    s0, s1 = (sde.s_of_t(torch.tensor(t, dtype=F64)).item() for t in (1e-5, 1.0))
    y0 = t64(x[:64])
    full = S.solve_adaptive(F, y0, s0, s1, S.Control(1e-6, 1e-6))
    limit = int(full.steps.median())
    cut = S.solve_adaptive(F, y0, s0, s1, S.Control(1e-6, 1e-6, max_steps=limit))
    over = full.steps > limit
    assert 0 < int(over.sum()) < 64
    assert (cut.status[over] == S.STEP_LIMIT).all() and (cut.status[~over] == S.OK).all()
    torch.testing.assert_close(cut.y[~over], full.y[~over], rtol=1e-12, atol=1e-12)
    assert (cut.steps[over] == limit).all()
    # through encode: no exception, the status is reported per sample
    res = encode(gm.model(sde), sde, y0, SolverConfig("dopri5", rtol=1e-6, atol=1e-6, max_steps=2))
    assert (res.status == S.STEP_LIMIT).all() and torch.isfinite(res.x).all()


def nan_for_marked(model, mid: bool):
    """NaN score for rows whose first coordinate is > 8 (only the marked sample), from the start or for t > 0.3."""

    def score(x, t):
        out = model(x, t).clone()
        hit = x[:, 0] > 8.0
        out[hit & (t > 0.3) if mid else hit] = float("nan")
        return out

    return score


@pytest.mark.parametrize("mid", [False, True], ids=["at-start", "mid-way"])
@pytest.mark.parametrize("solver", ["dopri5", "rk4", "dpmpp2m"])
def test_nonfinite_score_fails_only_its_sample(solver, mid):
    gm, sde = random_gmm(d=3, k=3, seed=0), SDES["vp"]()
    m = gm.model(sde)
    x = gm.sample(6, seed=1)
    assert np.abs(x).max() < 6
    x[2] = [15.0, 0.0, 0.0]  # the marked sample: VP shrinks it below 8 only after t = 0.3 (alpha(0.3) = 0.63)
    # max_steps caps a regression (a NaN sample spinning to the limit) at seconds; ~300 steps are needed
    cfg = SolverConfig("dopri5", rtol=1e-6, atol=1e-6, t_eps=1e-5, max_steps=2000) if solver == "dopri5" \
        else SolverConfig(solver, steps=40, t_eps=1e-5)
    res = encode(nan_for_marked(m, mid), sde, t64(x), cfg)
    clean = encode(m, sde, t64(x), cfg)
    others = torch.arange(6) != 2
    assert res.status[2] == S.NONFINITE
    assert (res.status[others] == S.OK).all()
    torch.testing.assert_close(res.x[others], clean.x[others], rtol=1e-12, atol=1e-12)
    if solver == "dopri5":
        assert res.nfe[2] < 3000  # given up after ~20 rejections near the failure, not run to max_steps


def test_dop853_tableau_is_built_on_first_use_only():
    """Importing the solvers does not import scipy.integrate (DOP853's coefficients): ~0.2 s of every
    command's start-up (benchmarks/README.md, "Where a trivial extract's time goes")."""
    import subprocess
    import sys

    code = ("import sys; import pflatents.tasks.ode.pfode as P, pflatents.tasks.ode.solvers as S; "
            "assert 'scipy.integrate' not in sys.modules; names = list(S.TABLEAUS); "
            "assert 'scipy.integrate' not in sys.modules; t = S.TABLEAUS['dop853']; "
            "assert 'scipy.integrate' in sys.modules and S.DOP853 is t and t.stages == 12 + 1 and t.order == 8; "
            "print(names)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "['euler', 'heun', 'rk4', 'dopri5', 'dop853']"
