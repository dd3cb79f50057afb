"""The float64 path through a trained-network adapter: label, preconditioning and state in float64.

Closed form: a ``GaussianPrecond`` network whose trunk outputs zero (its last layer is zero, as at
initialisation) with data statistics (mu, v) *is* the exact noise prediction of N(mu, diag v). Run in
float64 end to end, its score and its encode map must match the Gaussian closed forms to 1e-10.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from problems import Gaussian, schedule, t64
from pflatents.tasks.models.adapters import DeviceNet
from pflatents.tasks.models.networks import build_network
from pflatents.tasks.models.scores import EpsScore
from pflatents.tasks.ode.pfode import SolverConfig, decode, encode
from pflatents.tasks.ode.sde import VESDE, VPSDE

F64 = torch.float64
D = 6


def gaussian_net(sde_family: str, dtype=F64, seed: int = 0):
    """An MLP eps-network with random trunk weights except a zero last layer: the exact diag-Gaussian model."""
    torch.manual_seed(seed)
    net = build_network("mlp", (D,), sde_family, hidden=32, depth=2, emb_dim=16)
    rng = np.random.default_rng(seed)
    mu, var = 0.7 * rng.standard_normal(D), np.exp(rng.uniform(np.log(0.05), np.log(2.0), D))
    net.set_data_stats(torch.as_tensor(mu, dtype=torch.float32), torch.as_tensor(var, dtype=torch.float32))
    net = net.to(dtype)
    # the float32 buffers hold the model: the closed form uses exactly those values
    mu64, var64 = net.data_mean.double().numpy(), net.data_var.double().numpy()
    return net, Gaussian(mu64, np.diag(var64))


@pytest.mark.parametrize("sde_cls,family", [(VPSDE, "vp"), (VESDE, "ve")])
def test_float64_network_score_matches_the_gaussian_closed_form(sde_cls, family):
    sde = sde_cls()
    net, g = gaussian_net(family)
    score = EpsScore(DeviceNet(net), sde, time_fn=sde.s_of_t)
    sch = schedule(sde)
    x = t64(np.random.default_rng(1).standard_normal((32, D)))
    for t in (1e-5, 1e-3, 0.3, 1.0):
        got = score(x, torch.full((32,), t, dtype=F64))
        assert got.dtype == F64
        a, s = float(sch.alpha(np.float64(t))), float(sch.sigma(np.float64(t)))
        ref = -(x.numpy() - a * g.mu) / (a * a * np.diag(g.cov) + s * s)
        rel = np.abs(got.numpy() - ref).max() / np.abs(ref).max()
        assert rel <= 1e-12, (t, rel)


def test_float64_encode_decode_match_the_exact_flow_map_to_1e10():
    sde = VPSDE()
    net, g = gaussian_net("vp")
    score = EpsScore(DeviceNet(net), sde, time_fn=sde.s_of_t)
    x0 = g.sample(16, seed=2)
    cfg = SolverConfig("dopri5", rtol=1e-13, atol=1e-13, t_eps=1e-3)
    enc = encode(score, sde, t64(x0), cfg)
    assert enc.x.dtype == F64 and bool(enc.ok.all())
    assert np.abs(enc.x.numpy() - g.flow(sde, x0, 1e-3, sde.T)).max() <= 1e-10
    z = np.random.default_rng(3).standard_normal((16, D))
    dec = decode(score, sde, t64(z), cfg)
    assert np.abs(dec.x.numpy() - g.flow(sde, z, sde.T, 1e-3)).max() <= 1e-10


def test_time_label_is_not_rounded_to_float32():
    """float64 weights: eps is a smooth function of s at float64 resolution (a float32 label would be flat)."""
    torch.manual_seed(0)
    net = build_network("mlp", (D,), "vp", hidden=32, depth=2, emb_dim=16).double()
    torch.nn.init.normal_(net.trunk.out.weight, std=0.3)  # a non-zero learned part
    x = torch.randn(4, D, dtype=F64)
    s0 = torch.full((4,), -3.1, dtype=F64)
    with torch.no_grad():
        f = lambda s: net(x, s)  # noqa: E731
        slope = (f(s0 + 1e-5) - f(s0 - 1e-5)) / 2e-5
        tiny = (f(s0 + 1e-11) - f(s0)) / 1e-11  # s0 + 1e-11 is the same float32 number as s0
    assert float(s0[0].float()) == float((s0[0] + 1e-11).float())
    assert torch.allclose(tiny, slope, rtol=1e-3, atol=1e-4)  # forward difference: ~1e-5 rounding


def test_float32_network_gets_its_embedding_phase_from_the_float64_label():
    torch.manual_seed(0)
    net = build_network("mlp", (D,), "vp", hidden=32, depth=2, emb_dim=16)
    emb = net.trunk.time.emb
    s = torch.tensor([-9.123456789012345, 0.5, 3.3], dtype=F64)
    got = emb(s)
    assert got.dtype == torch.float32
    phase = s[:, None] * emb.w.double()[None]
    want = torch.cat([torch.sin(phase), torch.cos(phase)], 1).float()
    assert torch.equal(got, want)
    # the float32 path (training) is unchanged: phase in float32
    s32 = s.float()
    a32 = s32[:, None] * emb.w[None]
    assert torch.equal(emb(s32), torch.cat([torch.sin(a32), torch.cos(a32)], 1))
