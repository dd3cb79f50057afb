"""diffusers:DIR models: the discrete VP schedule, the score by hand from the UNet, errors, no pickles."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch

from pflatents.tasks.errors import ModelError
from pflatents.tasks.models.registry import load_model, model_info, native_sde, resolve_model_spec
from pflatents.tasks.ode.discrete import DiscreteVPSDE

F64 = torch.float64


def _ddpm_alphas(n: int = 1000) -> torch.Tensor:
    betas = torch.linspace(1e-4, 0.02, n, dtype=torch.float32)
    return torch.cumprod(1 - betas, 0).double()


def test_discrete_vp_passes_through_the_knots_and_inverts():
    ab = _ddpm_alphas()
    sde = DiscreteVPSDE(alphas_cumprod=tuple(ab.tolist()))
    i = torch.tensor([0, 1, 17, 500, 999])
    t = (i + 1).to(F64) / 1000
    torch.testing.assert_close(sde.alpha(t) ** 2, ab[i], rtol=1e-12, atol=0)
    torch.testing.assert_close(sde.sigma(t) ** 2, 1 - ab[i], rtol=1e-12, atol=0)
    torch.testing.assert_close(sde.timestep(t), i.to(F64), rtol=0, atol=1e-9)
    tt = torch.tensor([1e-5, 3e-4, 0.0105, 0.5, 0.77777, 1.0], dtype=F64)
    torch.testing.assert_close(sde.t_of_s(sde.s_of_t(tt)), tt, rtol=1e-9, atol=1e-12)
    # f and g2 agree with finite differences of the schedule inside a segment
    t0, h = torch.tensor([0.3333], dtype=F64), 1e-7
    dla = (sde.log_alpha(t0 + h) - sde.log_alpha(t0 - h)) / (2 * h)
    torch.testing.assert_close(sde.f(t0), dla, rtol=1e-6, atol=0)
    ds2 = (sde.sigma(t0 + h) ** 2 - sde.sigma(t0 - h) ** 2) / (2 * h)
    torch.testing.assert_close(sde.g2(t0), ds2 - 2 * sde.f(t0) * sde.sigma(t0) ** 2, rtol=1e-6, atol=0)
    # rebuilt from its dict form (what a store pins)
    from pflatents.tasks.config import sde_from_dict

    assert sde_from_dict(json.loads(json.dumps(sde.to_dict()))) == sde


def test_zero_terminal_snr_refused():
    with pytest.raises(ModelError, match="zero-terminal-SNR"):
        DiscreteVPSDE(alphas_cumprod=(0.9, 0.5, 0.0))


@pytest.fixture(scope="module")
def diffusers_mod():
    return pytest.importorskip("diffusers")


def _save(diffusers, root: Path, prediction_type: str = "epsilon", layout: str = "pipeline", seed: int = 0,
          **sched) -> Path:
    torch.manual_seed(seed)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                                 layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4)
    with torch.no_grad():  # random, non-trivial output
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=100, prediction_type=prediction_type,
                                        clip_sample=True, **sched)
    if layout == "pipeline":
        unet.save_pretrained(root / "unet", safe_serialization=True)
        scheduler.save_pretrained(root / "scheduler")
    else:
        unet.save_pretrained(root, safe_serialization=True)
        scheduler.save_pretrained(root)
    return root


@pytest.mark.parametrize("pred,layout", [("epsilon", "pipeline"), ("v_prediction", "flat"), ("sample", "pipeline")])
def test_score_equals_hand_computation(diffusers_mod, tmp_path, pred, layout):
    root = _save(diffusers_mod, tmp_path / "m", pred, layout, beta_schedule="squaredcos_cap_v2")
    spec = f"diffusers:{root}"
    sde = native_sde(spec)
    assert isinstance(sde, DiscreteVPSDE) and sde.num_train_timesteps == 100
    model = load_model(spec, sde)
    info = model_info(spec, sde)
    assert info.kind == "diffusers" and info.dim == 64 and len(info.content_hash) == 64

    # by hand: the scheduler's alphas_cumprod, the UNet at timestep i = t N - 1
    sched = diffusers_mod.DDPMScheduler.from_pretrained(root if layout == "flat" else root / "scheduler")
    unet = diffusers_mod.UNet2DModel.from_pretrained(root if layout == "flat" else root / "unet").eval()
    ab = sched.alphas_cumprod.double()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 1, 8, 8, generator=gen, dtype=F64)
    i = torch.tensor([0, 9, 50, 99])
    t = (i + 1).to(F64) / 100
    with torch.no_grad():
        out = unet(x.float(), i.float()).sample.double()
        a, s = ab[i].sqrt().reshape(-1, 1, 1, 1), (1 - ab[i]).sqrt().reshape(-1, 1, 1, 1)
        if pred == "epsilon":
            eps = out
        elif pred == "v_prediction":  # v = a eps - s x0 and x = a x0 + s eps  =>  eps = s x + a v
            eps = s * x + a * out
        else:
            eps = (x - a * out) / s
        expected = -eps / s
        got = model(x, t)
    torch.testing.assert_close(got, expected, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(model.sigma2_score(x, t), expected * s * s, rtol=2e-5, atol=2e-5)
    # off the knots the UNet gets the fractional timestep t N - 1
    with torch.no_grad():
        tm = torch.tensor([0.0555], dtype=F64)
        lab = unet(x[:1].float(), torch.tensor([4.55])).sample.double()
        if pred == "epsilon":
            torch.testing.assert_close(model(x[:1], tm), -lab / sde.sigma(tm), rtol=2e-5, atol=2e-5)


def test_clip_sample_is_never_applied(diffusers_mod, tmp_path):
    """A score far outside [-1, 1] in x0 terms stays unclipped (clip_sample=True in the config)."""
    root = _save(diffusers_mod, tmp_path / "m", "sample")
    sde = native_sde(f"diffusers:{root}")
    model = load_model(f"diffusers:{root}", sde)
    with torch.no_grad():
        model.net.module.conv_out.bias.add_(5.0)  # predicted x0 ~ 5, far outside clip_sample_range 1
    x = torch.randn(1, 1, 8, 8, dtype=F64)
    t = torch.tensor([0.01], dtype=F64)
    with torch.no_grad():
        x0 = model.x0(x, t)
        assert x0.min() > 1.5
        torch.testing.assert_close(model.sigma2_score(x, t), sde.alpha(t) * x0 - x)
    from pflatents.tasks.models import registry as models

    models._load_cached.cache_clear()  # the bias edit must not leak into other tests


def test_wrong_prediction_type_and_missing_files(diffusers_mod, tmp_path):
    root = _save(diffusers_mod, tmp_path / "m")
    cfg_path = root / "scheduler" / "scheduler_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["prediction_type"] = "flow_matching"
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="prediction_type 'flow_matching'"):
        load_model(f"diffusers:{root}", DiscreteVPSDE(alphas_cumprod=(0.9, 0.5)))

    root2 = _save(diffusers_mod, tmp_path / "m2")
    (root2 / "scheduler" / "scheduler_config.json").unlink()
    with pytest.raises(ModelError, match="no scheduler config"):
        native_sde(f"diffusers:{root2}")

    root3 = _save(diffusers_mod, tmp_path / "m3")
    (root3 / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(ModelError, match="missing .*diffusion_pytorch_model.safetensors"):
        native_sde(f"diffusers:{root3}")

    with pytest.raises(ModelError, match="not found"):
        native_sde(f"diffusers:{tmp_path / 'nope'}")


def test_bin_weights_refused_and_never_unpickled(diffusers_mod, tmp_path):
    root = _save(diffusers_mod, tmp_path / "m")
    (root / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    marker = tmp_path / "pwned"
    (root / "unet" / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps(_Evil(str(marker))))
    with pytest.raises(ModelError, match="pickle, refused"):
        load_model(f"diffusers:{root}", DiscreteVPSDE(alphas_cumprod=(0.9, 0.5)))
    assert not marker.exists()


def test_extract_cli_runs_under_the_models_schedule(diffusers_mod, tmp_path, prefect_api, capsys):
    """`extract --model diffusers:DIR` pins the discrete VP SDE; a mismatching --sde is refused."""
    import numpy as np

    from pflatents.flows.cli import main
    from pflatents.storage import LatentStore

    root = _save(diffusers_mod, tmp_path / "m")
    data = tmp_path / "x.npy"
    np.save(data, np.random.default_rng(0).uniform(-1, 1, (6, 1, 8, 8)).astype(np.float32))
    base = ["extract", "--data", str(data), "--model", f"diffusers:{root}", "--no-progress", "--solver", "heun",
            "--steps", "4"]
    assert main(base + ["--out", str(tmp_path / "bad.zarr"), "--sde", "ve"]) == 2
    assert "--sde ve does not match" in capsys.readouterr().err
    assert main(base + ["--out", str(tmp_path / "o.zarr")]) == 0
    cfg = LatentStore.open(str(tmp_path / "o.zarr"), mode="r").config
    assert cfg["sde"]["name"] == "vp_discrete" and len(cfg["sde"]["alphas_cumprod"]) == 100
    assert cfg["model"]["kind"] == "diffusers"


class _Evil:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_resolve_keeps_diffusers_prefix(tmp_path):
    assert resolve_model_spec(f"diffusers:{tmp_path}") == f"diffusers:{tmp_path.resolve()}"
