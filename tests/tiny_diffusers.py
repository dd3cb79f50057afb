"""Tiny randomly initialised diffusers models saved with ``save_pretrained`` (as diffusers tests itself),
and independent float64 references for their PF-ODEs (numpy/scipy, written from the formulas).

Every builder perturbs the random initialisation (diffusers zero-initialises some output layers, which
would make a network's prediction constant) and writes the folder layout a pipeline's
``save_pretrained`` writes: ``unet/`` or ``transformer/``, ``scheduler/``, and ``vae/`` for a latent model.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
from scipy.integrate import solve_ivp

F64 = torch.float64


def _perturb(module: torch.nn.Module, scale: float, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


def cond_unet(diffusers, num_classes: int = 3, channels: int = 1, size: int = 8, seed: int = 0):
    torch.manual_seed(seed)
    unet = diffusers.UNet2DModel(sample_size=size, in_channels=channels, out_channels=channels,
                                 block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                                 down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"), num_class_embeds=num_classes)
    with torch.no_grad():  # class embeddings that differ visibly
        unet.class_embedding.weight.mul_(5.0)
    return _perturb(unet, 0.05, seed)


def dit(diffusers, num_classes: int = 4, channels: int = 4, size: int = 8, seed: int = 0, learn_sigma: bool = True):
    torch.manual_seed(seed)
    net = diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=channels,
                                          out_channels=2 * channels if learn_sigma else channels, num_layers=2,
                                          sample_size=size, patch_size=2, num_embeds_ada_norm=num_classes,
                                          norm_num_groups=4)
    return _perturb(net, 0.05, seed)


def vae(diffusers, kind: str = "AutoencoderKL", channels: int = 3, latent_channels: int = 4, seed: int = 0):
    torch.manual_seed(seed)
    common = dict(in_channels=channels, out_channels=channels, block_out_channels=(8, 16), latent_channels=latent_channels,
                  down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                  up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), norm_num_groups=4, sample_size=16)
    if kind == "VQModel":
        return diffusers.VQModel(num_vq_embeddings=16, vq_embed_dim=latent_channels, **common)
    return diffusers.AutoencoderKL(**common)


def flow_unet(diffusers, channels: int = 1, size: int = 8, seed: int = 0):
    torch.manual_seed(seed)
    unet = diffusers.UNet2DModel(sample_size=size, in_channels=channels, out_channels=channels,
                                 block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                                 down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"))
    return _perturb(unet, 0.05, seed)


def save_pipeline(root: Path, net, scheduler, vae_model=None) -> Path:
    """The pipeline layout: unet/ (UNet2DModel) or transformer/, scheduler/, and vae/ if given."""
    part = "unet" if type(net).__name__.startswith("UNet") else "transformer"
    net.save_pretrained(root / part, safe_serialization=True)
    scheduler.save_pretrained(root / "scheduler")
    if vae_model is not None:
        vae_model.save_pretrained(root / "vae", safe_serialization=True)
    return root


# ---- independent references ----------------------------------------------------------------------

def discrete_vp_reference(eps_fn, alphas_cumprod: np.ndarray, x0: np.ndarray, t0: float, t1: float = 1.0,
                          tol: float = 1e-10) -> np.ndarray:
    """The PF-ODE of a DDPM schedule in float64 by scipy (DOP853), one sample at a time.

    The schedule restated from docs/math.md: knots t_k = k/N, log alpha_bar(t_k) = log alphas_cumprod[k-1]
    (0 at t = 0), linear in t between knots (np.interp); sigma^2 = 1 - alpha_bar; the network's label is
    i = t N - 1. With la = log alpha_bar: f = la'/2, g^2 = -la', score = -eps/sigma, so
    dx/dt = la'/2 (x - eps/sigma). ``eps_fn(x (D,) float64, label float) -> (D,)``.
    """
    n = len(alphas_cumprod)
    knots = np.arange(n + 1) / n
    la = np.concatenate([[0.0], np.log(np.asarray(alphas_cumprod, dtype=np.float64))])
    slopes = np.diff(la) * n

    def rhs(t, y):
        k = min(max(int(np.floor(t * n)), 0), n - 1)
        lab = np.interp(t, knots, la)
        sig = np.sqrt(-np.expm1(lab))
        return 0.5 * slopes[k] * (y - eps_fn(y, t * n - 1.0) / sig)

    out = []
    for xi in np.atleast_2d(x0):
        # integrate knot to knot: the right-hand side has a kink at each
        pts = [t0] + [k / n for k in range(int(np.floor(t0 * n)) + 1, int(np.ceil(t1 * n)))] + [t1]
        y = np.asarray(xi, dtype=np.float64)
        for a, b in zip(pts[:-1], pts[1:]):
            if b > a:
                sol = solve_ivp(rhs, (a, b), y, method="DOP853", rtol=tol, atol=tol)
                assert sol.success, sol.message
                y = sol.y[:, -1]
        out.append(y)
    return np.array(out)


def flow_reference(v_fn, x: np.ndarray, t0: float, t1: float, tol: float = 1e-10) -> np.ndarray:
    """dx/dt = v(x, t) in float64 by scipy (DOP853), one sample at a time; ``v_fn(x (D,), t) -> (D,)``."""
    out = []
    for xi in np.atleast_2d(x):
        sol = solve_ivp(lambda t, y: v_fn(y, t), (t0, t1), np.asarray(xi, dtype=np.float64), method="DOP853",
                        rtol=tol, atol=tol)
        assert sol.success, sol.message
        out.append(sol.y[:, -1])
    return np.array(out)


def torch_fn(module, shape, call, cond=None):
    """A float64 numpy function y (D,), label -> (D,) of a float64 copy of ``module``:
    ``call(module, x (1, *shape), label (1,), cond (1,) or None) -> (1, *shape)``."""
    m = copy.deepcopy(module).double().eval()
    c = None if cond is None else torch.tensor([int(cond)])

    def fn(y, label):
        with torch.no_grad():
            x = torch.from_numpy(np.asarray(y, dtype=np.float64)).reshape(1, *shape)
            out = call(m, x, torch.tensor([float(label)], dtype=F64), c)
        return out.reshape(-1).numpy()

    return fn
