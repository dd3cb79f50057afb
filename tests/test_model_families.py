"""Model families of diffusers folders: class-conditional UNet and DiT, latent diffusion (VAE + network),
flow matching. Tiny random models saved with ``save_pretrained`` and loaded offline; every PF-ODE latent
is checked against an independent float64 integration (scipy on the same network, or diffusers' own
Euler steps), labels against their effect, the VAE against diffusers' own encode/decode."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pflatents.tasks.errors import DataError, ModelError
from pflatents.tasks.models.registry import load_model, native_sde
from pflatents.tasks.ode.pfode import SolverConfig, decode, encode, integrate
import tiny_diffusers as T

F64 = torch.float64
TIGHT = SolverConfig("dopri5", rtol=1e-7, atol=1e-7, t_eps=1e-3)
REF_TOL, ATOL = 1e-8, 2e-5  # scipy's tolerance, and the agreement asked of a latent of size ~1


@pytest.fixture(scope="module")
def diffusers_mod():
    return pytest.importorskip("diffusers")


def _unet_eps(m, x, label, cond):
    return m(x, label, class_labels=cond).sample


def _dit_eps(m, x, label, cond):
    c = x.shape[1]
    return m(x, timestep=label, class_labels=cond).sample[:, :c]


def _ddpm(diffusers, n=20, **kw):
    return diffusers.DDPMScheduler(num_train_timesteps=n, beta_schedule="squaredcos_cap_v2", **kw)


# ---- class-conditional ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cond_unet_dir(diffusers_mod, tmp_path_factory):
    root = tmp_path_factory.mktemp("cond_unet")
    return T.save_pipeline(root, T.cond_unet(diffusers_mod), _ddpm(diffusers_mod))


@pytest.mark.slow
def test_conditional_unet_latent_equals_scipy_and_depends_on_label(diffusers_mod, cond_unet_dir):
    spec = f"diffusers:{cond_unet_dir}"
    sde = native_sde(spec)
    model = load_model(spec, sde, precision="fp64")
    assert model.conditional and model.num_classes == 3 and model.latent_shape == model.data_shape == (1, 8, 8)
    x = torch.from_numpy(np.random.default_rng(0).uniform(-1, 1, (3, 1, 8, 8)))
    labels = torch.tensor([0, 1, 2])
    z = encode(model, sde, x, TIGHT, cond=labels).x
    unet = diffusers_mod.UNet2DModel.from_pretrained(str(cond_unet_dir / "unet"), use_safetensors=True)
    ref = T.discrete_vp_reference(T.torch_fn(unet, (1, 8, 8), _unet_eps, labels.numpy()), np.array(sde.alphas_cumprod),
                                  x.reshape(3, -1).numpy(), TIGHT.t_eps, tol=REF_TOL)
    np.testing.assert_allclose(z.reshape(3, -1).numpy(), ref, rtol=0, atol=ATOL)
    # another label, another latent (the class embedding reaches every evaluation)
    fast = SolverConfig("dopri5", rtol=1e-5, atol=1e-5, t_eps=1e-3)
    z1 = encode(model, sde, x, fast, cond=labels).x
    z2 = encode(model, sde, x, fast, cond=torch.tensor([1, 2, 0])).x
    assert ((z2 - z1).reshape(3, -1).abs().max(1).values > 1e-2).all()
    # each row's label follows it through the adaptive solver's row subsetting: alone = in the batch
    # (up to the last bits of batched convolutions, which move the adaptive steps a little)
    for i in range(3):
        zi = encode(model, sde, x[i:i + 1], fast, cond=labels[i:i + 1]).x
        torch.testing.assert_close(zi[0], z1[i], rtol=0, atol=1e-4)


def test_conditional_model_refuses_missing_or_bad_labels(diffusers_mod, cond_unet_dir):
    spec = f"diffusers:{cond_unet_dir}"
    sde = native_sde(spec)
    model = load_model(spec, sde)
    x = torch.zeros(2, 1, 8, 8)
    with pytest.raises(DataError, match="class-conditional .*without labels.*--class-label"):
        encode(model, sde, x, SolverConfig("euler", steps=2))
    with pytest.raises(DataError, match="class label 7 is out of range .*3 classes"):
        encode(model, sde, x, SolverConfig("euler", steps=2), cond=torch.tensor([0, 7]))


@pytest.mark.slow
def test_dit_latent_diffusion_pipeline(diffusers_mod, tmp_path):
    """A DiTPipeline-style folder (transformer/ DiT with learned sigma, vae/ AutoencoderKL, scheduler/):
    the encoder is the VAE's posterior mean times its scaling factor, the PF-ODE latent lives in the
    VAE's latent space and matches scipy, and decoding closes the round trip in pixel space."""
    root = T.save_pipeline(tmp_path / "dit", T.dit(diffusers_mod), _ddpm(diffusers_mod), T.vae(diffusers_mod))
    spec = f"diffusers:{root}"
    sde = native_sde(spec)
    model = load_model(spec, sde, precision="fp64")
    assert model.data_shape == (3, 16, 16) and model.latent_shape == (4, 8, 8) and model.conditional
    px = torch.from_numpy(np.random.default_rng(1).uniform(-1, 1, (2, 3, 16, 16)))
    vae = diffusers_mod.AutoencoderKL.from_pretrained(str(root / "vae"), use_safetensors=True).double()
    with torch.no_grad():
        lat = vae.encode(px).latent_dist.mean * vae.config.scaling_factor
    torch.testing.assert_close(model.encode_data(px), lat, rtol=1e-10, atol=1e-12)
    labels = torch.tensor([3, 1])
    res = encode(model, sde, px, TIGHT, cond=labels)
    assert res.x.shape == (2, 4, 8, 8) and (res.status == 0).all()
    net = diffusers_mod.DiTTransformer2DModel.from_pretrained(str(root / "transformer"), use_safetensors=True)
    ref = T.discrete_vp_reference(T.torch_fn(net, (4, 8, 8), _dit_eps, labels.numpy()), np.array(sde.alphas_cumprod),
                                  lat.reshape(2, -1).numpy(), TIGHT.t_eps, tol=REF_TOL)
    np.testing.assert_allclose(res.x.reshape(2, -1).numpy(), ref, rtol=0, atol=ATOL)
    # decode: the PF-ODE back to t_eps in latent space, then the VAE's decoder (of latent / scaling_factor)
    back_lat = integrate(model, sde, res.x, 1.0, TIGHT.t_eps, TIGHT, cond=labels).x
    back = decode(model, sde, res.x, TIGHT, cond=labels).x
    assert back.shape == (2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(back, vae.decode(back_lat / vae.config.scaling_factor).sample, rtol=0, atol=1e-12)
        own = vae.decode(lat / vae.config.scaling_factor).sample  # the VAE's own round trip of the data
    # the pixel round trip closes up to the latent round trip's error (a random network's flow is
    # ill-conditioned: measured 3e-4 in latent and 4e-3 in pixel space at tolerance 1e-7)
    assert float((back_lat - lat).abs().max()) < 2e-3
    assert float((back - own).abs().max()) < 2e-2 < float((own - px).abs().max())
    z_other = encode(model, sde, px, TIGHT, cond=torch.tensor([0, 2])).x
    assert ((z_other - res.x).reshape(2, -1).abs().max(1).values > 1e-3).all()


def test_vq_latent_model_round_trip(diffusers_mod, tmp_path):
    """An LDM-style folder (unconditional UNet2DModel in a VQModel's latent space): decode quantises,
    so the pixel round trip equals VQModel's own forward (encode, quantise, decode)."""
    torch.manual_seed(0)
    unet = T.flow_unet(diffusers_mod, channels=4)
    root = T.save_pipeline(tmp_path / "ldm", unet, diffusers_mod.DDIMScheduler(num_train_timesteps=20),
                           T.vae(diffusers_mod, "VQModel"))
    spec = f"diffusers:{root}"
    sde = native_sde(spec)
    model = load_model(spec, sde, precision="fp64")
    assert not model.conditional and model.data_shape == (3, 16, 16) and model.latent_shape == (4, 8, 8)
    px = torch.from_numpy(np.random.default_rng(2).uniform(-1, 1, (2, 3, 16, 16)))
    res = encode(model, sde, px, TIGHT)
    back = decode(model, sde, res.x, TIGHT)
    vq = diffusers_mod.VQModel.from_pretrained(str(root / "vae"), use_safetensors=True).double()
    with torch.no_grad():
        own = vq(px).sample  # encode, quantise, decode
        lat = vq.encode(px).latents * vq.config.scaling_factor
    torch.testing.assert_close(model.encode_data(px), lat, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(back.x, own, rtol=0, atol=1e-6)  # the same codes: the latent round trip lands in them
    with pytest.raises(DataError, match=r"takes images of shape \(3, 16, 16\)"):
        model.encode_data(torch.zeros(1, 3, 8, 8, dtype=F64))


def test_latent_model_hash_covers_the_vae(diffusers_mod, tmp_path):
    from pflatents.tasks.models.registry import model_info

    a = T.save_pipeline(tmp_path / "a", T.dit(diffusers_mod), _ddpm(diffusers_mod), T.vae(diffusers_mod, seed=0))
    b = T.save_pipeline(tmp_path / "b", T.dit(diffusers_mod), _ddpm(diffusers_mod), T.vae(diffusers_mod, seed=1))
    sde = native_sde(f"diffusers:{a}")
    assert model_info(f"diffusers:{a}", sde).content_hash != model_info(f"diffusers:{b}", sde).content_hash


# ---- flow matching ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def flow_dir(diffusers_mod, tmp_path_factory):
    root = tmp_path_factory.mktemp("flow")
    sched = diffusers_mod.FlowMatchEulerDiscreteScheduler(num_train_timesteps=20, shift=3.0)
    return T.save_pipeline(root, T.flow_unet(diffusers_mod), sched)


def _flow_v(unet):
    return T.torch_fn(unet, (1, 8, 8), lambda m, x, lab, c: m(x, lab * 20.0).sample)


def test_flow_matching_latent_equals_scipy(diffusers_mod, flow_dir):
    spec = f"diffusers:{flow_dir}"
    sde = native_sde(spec)
    assert sde.name == "flow" and sde.T == 1.0
    model = load_model(spec, sde, precision="fp64")
    x = torch.from_numpy(np.random.default_rng(3).uniform(-1, 1, (3, 1, 8, 8)))
    res = encode(model, sde, x, TIGHT)
    assert (res.status == 0).all()
    unet = diffusers_mod.UNet2DModel.from_pretrained(str(flow_dir / "unet"), use_safetensors=True)
    ref = T.flow_reference(_flow_v(unet), x.reshape(3, -1).numpy(), TIGHT.t_eps, 1.0)
    np.testing.assert_allclose(res.x.reshape(3, -1).numpy(), ref, rtol=0, atol=ATOL)
    # fixed steps on a grid in t (the log-SNR grid is infinite at T = 1 and is refused)
    rk4 = encode(model, sde, x, SolverConfig("rk4", steps=64, grid="time", t_eps=1e-3)).x
    np.testing.assert_allclose(rk4.reshape(3, -1).numpy(), ref, rtol=0, atol=1e-5)
    from pflatents.tasks.errors import SolverError

    with pytest.raises(SolverError, match="alpha = 0 at T.*--grid time"):
        encode(model, sde, x, SolverConfig("rk4", steps=4, t_eps=1e-3))


def test_flow_matching_decode_equals_diffusers_euler(diffusers_mod, flow_dir):
    """Decoding from the prior at t = 1 to t_eps: diffusers' own FlowMatchEulerDiscreteScheduler steps
    (x += (sigma_next - sigma) v, timestep = 1000 sigma) converge to it at first order."""
    spec = f"diffusers:{flow_dir}"
    sde = native_sde(spec)
    model = load_model(spec, sde, precision="fp64")
    z = torch.from_numpy(np.random.default_rng(4).standard_normal((2, 1, 8, 8)))
    ours = decode(model, sde, z, TIGHT).x
    unet = diffusers_mod.UNet2DModel.from_pretrained(str(flow_dir / "unet"), use_safetensors=True).double()
    errs = []
    for n in (200, 400):
        sched = diffusers_mod.FlowMatchEulerDiscreteScheduler.from_pretrained(str(flow_dir / "scheduler"))
        sched.set_timesteps(sigmas=np.linspace(1.0, TIGHT.t_eps, n + 1)[:-1].tolist())
        sched.sigmas[-1] = TIGHT.t_eps  # stop at t_eps instead of 0: the same end point as ours
        x = z.clone()
        with torch.no_grad():
            for ts in sched.timesteps:
                x = sched.step(unet(x, ts.expand(2)).sample, ts, x).prev_sample
        errs.append(float((x - ours).abs().max()))
    assert errs[1] < 1e-2 and 1.6 < errs[0] / errs[1] < 2.4, errs  # first order: half the error at twice the steps


def test_flow_scheduler_variants(diffusers_mod, tmp_path):
    from pflatents.tasks.ode.sde import FlowSDE

    root = T.save_pipeline(tmp_path / "f", T.flow_unet(diffusers_mod),
                           diffusers_mod.FlowMatchEulerDiscreteScheduler(invert_sigmas=True))
    with pytest.raises(ModelError, match="invert_sigmas"):
        native_sde(f"diffusers:{root}")
    root2 = T.save_pipeline(tmp_path / "g", T.flow_unet(diffusers_mod), _ddpm(diffusers_mod))
    with pytest.raises(ModelError, match="run it under that SDE .*--sde vp"):
        load_model(f"diffusers:{root2}", FlowSDE())


# ---- a flow folder declares its SDE: no --sde needed ------------------------------------------------

def test_a_flow_folder_runs_under_its_own_sde_without_the_flag(diffusers_mod, flow_dir, tmp_path):
    """Without --sde the job takes the folder's flow SDE (pinned resolved); an explicit --sde vp is refused
    naming both; an explicit --sde flow is the same job."""
    from pflatents.flows.coordinator import Job, prepare
    from pflatents.tasks.errors import InputError

    np.save(tmp_path / "x.npy", np.zeros((2, 1, 8, 8), np.float32))
    job = dict(data=str(tmp_path / "x.npy"), model=f"diffusers:{flow_dir}", out=str(tmp_path / "o.zarr"))
    plain = prepare(Job(**job).resolved()).cfg
    assert plain.sde.name == "flow" and plain == prepare(Job(**job, sde="flow").resolved()).cfg
    with pytest.raises(InputError, match=r"flow SDE; --sde vp does not match it \(use --sde flow, or leave --sde out"):
        prepare(Job(**job, sde="vp").resolved())


def test_extract_cli_flow_folder_without_sde(diffusers_mod, flow_dir, tmp_path, prefect_api, capsys):
    """`pflatents extract --model diffusers:FLOW_DIR` with no --sde: the store pins the flow SDE and holds
    the latents of the same run with --sde flow, bit for bit; --sde ve is exit 2 with nothing written."""
    import zarr

    from pflatents.flows.cli import main
    from pflatents.storage import LatentStore

    x = np.random.default_rng(5).uniform(-1, 1, (4, 1, 8, 8)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    base = ["extract", "--data", str(tmp_path / "x.npy"), "--model", f"diffusers:{flow_dir}", "--no-progress"]
    assert main(base + ["--out", str(tmp_path / "auto.zarr")]) == 0
    assert main(base + ["--sde", "flow", "--out", str(tmp_path / "flag.zarr")]) == 0
    assert LatentStore.open(str(tmp_path / "auto.zarr"), mode="r").config["sde"]["name"] == "flow"
    z_auto, z_flag = (zarr.open_group(str(tmp_path / n), mode="r")["latents"][:] for n in ("auto.zarr", "flag.zarr"))
    assert np.isfinite(z_auto).all() and np.array_equal(z_auto, z_flag)
    capsys.readouterr()
    assert main(base + ["--sde", "ve", "--out", str(tmp_path / "bad.zarr")]) == 2
    assert not (tmp_path / "bad.zarr").exists() and "--sde ve does not match" in capsys.readouterr().err


def test_a_vae_flow_folder_integrates_its_networks_velocity(diffusers_mod, tmp_path):
    """VAE + flow-matching UNet: the latent-space PF-ODE is the UNet's velocity, finite at t = 1 (the
    score-derived default is not), so the latent equals scipy's flow of the VAE's encoding."""
    unet = T.flow_unet(diffusers_mod, channels=4)
    root = T.save_pipeline(tmp_path / "lf", unet, diffusers_mod.FlowMatchEulerDiscreteScheduler(num_train_timesteps=20),
                           T.vae(diffusers_mod))
    spec = f"diffusers:{root}"
    sde = native_sde(spec)
    assert sde.name == "flow"
    model = load_model(spec, sde, precision="fp64")
    px = torch.from_numpy(np.random.default_rng(6).uniform(-1, 1, (2, 3, 16, 16)))
    res = encode(model, sde, px, TIGHT)
    assert (res.status == 0).all() and torch.isfinite(res.x).all()
    lat = model.encode_data(px).reshape(2, -1).numpy()
    v = T.torch_fn(unet, (4, 8, 8), lambda m, x, lab, c: m(x, lab * 20.0).sample)
    ref = T.flow_reference(v, lat, TIGHT.t_eps, 1.0)
    np.testing.assert_allclose(res.x.reshape(2, -1).numpy(), ref, rtol=0, atol=ATOL)
