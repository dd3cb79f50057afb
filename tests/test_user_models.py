"""``py:`` models: the user's own nn.Module with a declared parameterisation and schedule.

The modules here are written by the tests as files: exact networks of Gaussian data N(mu, s^2 I),
whose PF-ODE map is known in closed form (docs/math.md), so every declared parameterisation and
schedule is checked against the exact latent, not against another integration."""

from __future__ import annotations

import textwrap

import numpy as np
import pytest
import torch

from pflatents.tasks.errors import DataError, ModelError
from pflatents.tasks.models.registry import load_model, model_info, native_sde, resolve_model_spec
from pflatents.tasks.ode.pfode import SolverConfig, decode, encode
from pflatents.tasks.ode.sde import FlowSDE, VPSDE
from problems import Gaussian

F64 = torch.float64
TIGHT = SolverConfig("dopri5", rtol=1e-9, atol=1e-9, t_eps=1e-3)
MU = [0.5, -1.0, 0.25, 2.0]
S = 0.3

# The exact noise / score / x0 / v networks of N(MU, S^2 I) under the VP SDE (beta 0.1..20), the
# network getting the VP time t (time_label "t"); and the exact class-conditional flow velocity
# (class k: mean MU * (k + 1)), the network getting 1000 t (time_label "t", time_scale 1000).
MODULE = textwrap.dedent(f"""
    import torch

    MU, S2 = {MU!r}, {S}**2

    class ExactVP(torch.nn.Module):
        def __init__(self, kind):
            super().__init__()
            self.kind = kind
            self.gain = torch.nn.Parameter(torch.ones((), dtype=torch.float64))
            self.register_buffer("mu", torch.tensor(MU, dtype=torch.float64))

        def forward(self, x, t):
            la = -0.25 * t ** 2 * (20.0 - 0.1) - 0.5 * t * 0.1
            a, sig = torch.exp(la)[:, None], torch.sqrt(-torch.expm1(2 * la))[:, None]
            score = -(x - a * self.mu) / (a * a * S2 + sig * sig)
            eps = -sig * score
            x0 = (x + sig * sig * score) / a
            out = {{"eps": eps, "score": score, "x0": x0, "v": a * eps - sig * x0}}[self.kind]
            return self.gain * out

    class ExactFlow(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gain = torch.nn.Parameter(torch.ones((), dtype=torch.float64))
            self.register_buffer("mu", torch.tensor(MU, dtype=torch.float64))

        def forward(self, x, label, cond=None):
            t = (label / 1000.0)[:, None]
            mu = self.mu if cond is None else self.mu * (cond[:, None] + 1).to(x.dtype)
            v = (1 - t) ** 2 * S2 + t ** 2
            return self.gain * (-mu + (t - (1 - t) * S2) / v * (x - (1 - t) * mu))

    def vp(kind):
        return ExactVP(kind), {{"parameterization": kind, "schedule": {{"kind": "vp"}}, "sample_shape": [4]}}

    def eps():
        return vp("eps")

    def score():
        return vp("score")

    def x0():
        return vp("x0")

    def v():
        return vp("v")

    def flow():
        return ExactFlow(), {{"parameterization": "velocity", "schedule": {{"kind": "flow"}}, "sample_shape": [4],
                             "time_scale": 1000, "num_classes": 3}}

    def flow_plain():
        return ExactFlow(), {{"parameterization": "velocity", "schedule": {{"kind": "flow"}}, "sample_shape": [4],
                             "time_scale": 1000}}
""")


@pytest.fixture()
def module_file(tmp_path):
    p = tmp_path / "exact_nets.py"
    p.write_text(MODULE)
    return p


@pytest.mark.parametrize("kind", ["eps", "score", "x0", "v"])
def test_vp_parameterisations_give_the_exact_gaussian_latent(module_file, kind):
    spec = f"py:{module_file}:{kind}"
    sde = native_sde(spec)
    assert sde == VPSDE()
    model = load_model(spec, sde, precision="fp64")
    g = Gaussian(np.array(MU), S**2 * np.eye(4))
    x = g.sample(5, seed=0)
    z = encode(model, sde, torch.from_numpy(x), TIGHT).x.numpy()
    np.testing.assert_allclose(z, g.flow(sde, x, TIGHT.t_eps, 1.0), rtol=0, atol=1e-6)
    back = decode(model, sde, torch.from_numpy(z), TIGHT).x.numpy()
    np.testing.assert_allclose(back, x, rtol=0, atol=1e-6)


def test_flow_velocity_conditional_gives_the_exact_latent(module_file):
    """x_t = (1 - t) x0 + t eps for class k's N(mu_k, s^2 I): the exact map to t = 1 is
    z = (x0 - (1 - t_eps) mu_k) / sqrt((1 - t_eps)^2 s^2 + t_eps^2); labels pick mu_k per row."""
    spec = f"py:{module_file}:flow"
    sde = native_sde(spec)
    assert sde == FlowSDE()
    model = load_model(spec, sde, precision="fp64")
    assert model.conditional and model.num_classes == 3
    rng = np.random.default_rng(1)
    labels = np.array([0, 2, 1, 2])
    mus = np.array(MU)[None] * (labels[:, None] + 1)
    x = mus + S * rng.standard_normal((4, 4))
    te = TIGHT.t_eps
    exact = (x - (1 - te) * mus) / np.sqrt((1 - te) ** 2 * S**2 + te**2)
    res = encode(model, sde, torch.from_numpy(x), TIGHT, cond=torch.from_numpy(labels))
    np.testing.assert_allclose(res.x.numpy(), exact, rtol=0, atol=1e-6)
    with pytest.raises(DataError, match="without labels"):
        encode(model, sde, torch.from_numpy(x), TIGHT)


def test_weights_are_safetensors_and_hashed(tmp_path):
    from safetensors.torch import save_file

    src = textwrap.dedent("""
        import torch

        def build():
            net = torch.nn.Linear(2, 2).double()
            return net, {"parameterization": "eps", "schedule": {"kind": "ve"}, "sample_shape": [2],
                         "weights": "w.safetensors", "time_label": "log_sigma"}

        class Wrap(torch.nn.Module):
            pass
    """).replace("net = torch.nn.Linear(2, 2).double()", "net = Lin()") + textwrap.dedent("""
        class Lin(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.lin = torch.nn.Linear(2, 2).double()

            def forward(self, x, label):
                return self.lin(x) * label[:, None]
    """)
    (tmp_path / "m.py").write_text(src)
    w = {"lin.weight": torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=F64), "lin.bias": torch.tensor([0.5, -0.5], dtype=F64)}
    save_file(w, str(tmp_path / "w.safetensors"))
    spec = resolve_model_spec(f"py:{tmp_path / 'm.py'}:build")
    sde = native_sde(spec)
    model = load_model(spec, sde, precision="fp64")
    x, t = torch.tensor([[1.0, -1.0]], dtype=F64), torch.tensor([0.5], dtype=F64)
    expected_eps = (x @ w["lin.weight"].T + w["lin.bias"]) * torch.log(sde.sigma(t))
    torch.testing.assert_close(model.sigma2_score(x, t), -sde.sigma(t) * expected_eps)
    h1 = model_info(spec, sde).content_hash
    w["lin.bias"] += 1.0
    save_file(w, str(tmp_path / "w.safetensors"))
    assert model_info(spec, sde).content_hash != h1  # new weights, new hash (and no stale cache)
    # a pickled weights file is refused without being read
    (tmp_path / "m.py").write_text(src.replace("w.safetensors", "w.pt"))
    torch.save(w, str(tmp_path / "w.pt"))
    with pytest.raises(ModelError, match=r"must be a \.safetensors file"):
        native_sde(spec)


@pytest.mark.parametrize("body,match", [
    ("def build():\n    return 3", r"must return \(torch.nn.Module, declaration dict\)"),
    ("import torch\ndef build():\n    return torch.nn.Linear(1, 1), {'schedule': {'kind': 'vp'}, 'sample_shape': [1]}",
     "needs parameterization"),
    ("import torch\ndef build():\n    return torch.nn.Linear(1, 1), {'parameterization': 'noise', "
     "'schedule': {'kind': 'vp'}, 'sample_shape': [1]}", "parameterization 'noise' is not one of"),
    ("import torch\ndef build():\n    return torch.nn.Linear(1, 1), {'parameterization': 'eps', "
     "'schedule': {'kind': 'cosine'}, 'sample_shape': [1]}", "bad schedule"),
    ("import torch\ndef build():\n    return torch.nn.Linear(1, 1), {'parameterization': 'eps', "
     "'schedule': {'kind': 'vp'}, 'sample_shape': [1], 'colour': 1}", "unknown declaration key"),
    ("raise RuntimeError('boom')", "raised RuntimeError: boom"),
    ("x = 1", "has no callable 'build'"),
])
def test_bad_user_models_are_clear_errors(tmp_path, body, match):
    (tmp_path / "bad.py").write_text(body)
    with pytest.raises(ModelError, match=match):
        native_sde(f"py:{tmp_path / 'bad.py'}:build")


def test_spec_forms(tmp_path, monkeypatch):
    with pytest.raises(ModelError, match="no such Python file"):
        resolve_model_spec(f"py:{tmp_path / 'nope.py'}:build")
    with pytest.raises(ModelError, match="must be py:module:callable"):
        resolve_model_spec("py:justaname")
    (tmp_path / "mypkg_nets.py").write_text(MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = resolve_model_spec("py:mypkg_nets:eps")
    assert spec == "py:mypkg_nets:eps"
    assert native_sde(spec) == VPSDE()


def test_extract_cli_with_a_py_flow_model(module_file, tmp_path, prefect_api, capsys):
    """`extract --model py:FILE:flow_plain --sde flow` pins the flow SDE and the py kind and stores the exact
    latents; the conditional variant on unlabelled data is refused before anything is written."""
    from pflatents.flows.cli import main
    from pflatents.storage import LatentStore

    g = Gaussian(np.array(MU), S**2 * np.eye(4))
    x = g.sample(8, seed=2).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    base = ["extract", "--data", str(tmp_path / "x.npy"), "--no-progress", "--sde", "flow", "--dtype", "float64",
            "--rtol", "1e-9", "--atol", "1e-9", "--t-eps", "1e-3"]
    assert main(base + ["--model", f"py:{module_file}:flow_plain", "--out", str(tmp_path / "o.zarr")]) == 0
    store = LatentStore.open(str(tmp_path / "o.zarr"), mode="r")
    assert store.config["sde"]["name"] == "flow" and store.config["model"]["kind"] == "py"
    z = np.asarray(store.latents_array()[:8]) if hasattr(store, "latents_array") else None
    if z is None:
        import zarr

        z = zarr.open_group(str(tmp_path / "o.zarr"), mode="r")["latents"][:8]
    te = 1e-3
    exact = (x.astype(np.float64) - (1 - te) * np.array(MU)) / np.sqrt((1 - te) ** 2 * S**2 + te**2)
    np.testing.assert_allclose(z, exact, rtol=0, atol=1e-5)
    capsys.readouterr()
    out = tmp_path / "c.zarr"
    assert main(base + ["--model", f"py:{module_file}:flow", "--out", str(out)]) == 2 and not out.exists()
    assert "label" in capsys.readouterr().err
