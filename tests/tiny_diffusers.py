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
                          tol: float = 1e-9) -> np.ndarray:
    """The PF-ODE of a DDPM schedule in float64 by scipy (DOP853), all rows as one system.

    The schedule restated from docs/math.md: knots t_k = k/N, log alpha_bar(t_k) = log alphas_cumprod[k-1]
    (0 at t = 0), linear in t between knots (np.interp); sigma^2 = 1 - alpha_bar; the network's label is
    i = t N - 1. With la = log alpha_bar: f = la'/2, g^2 = -la', score = -eps/sigma, so
    dx/dt = la'/2 (x - eps/sigma), integrated knot to knot (the right-hand side has a kink at each).
    ``eps_fn(x (B, D) float64, label float) -> (B, D)``.
    """
    n = len(alphas_cumprod)
    knots = np.arange(n + 1) / n
    la = np.concatenate([[0.0], np.log(np.asarray(alphas_cumprod, dtype=np.float64))])
    slopes = np.diff(la) * n
    x0 = np.atleast_2d(np.asarray(x0, dtype=np.float64))
    shape = x0.shape

    def rhs(t, y):
        k = min(max(int(np.floor(t * n)), 0), n - 1)
        sig = np.sqrt(-np.expm1(np.interp(t, knots, la)))
        x = y.reshape(shape)
        return (0.5 * slopes[k] * (x - eps_fn(x, t * n - 1.0) / sig)).reshape(-1)

    pts = [t0] + [k / n for k in range(int(np.floor(t0 * n)) + 1, int(np.ceil(t1 * n)))] + [t1]
    y = x0.reshape(-1)
    for a, b in zip(pts[:-1], pts[1:]):
        if b > a:
            sol = solve_ivp(rhs, (a, b), y, method="DOP853", rtol=tol, atol=tol)
            assert sol.success, sol.message
            y = sol.y[:, -1]
    return y.reshape(shape)


def flow_reference(v_fn, x: np.ndarray, t0: float, t1: float, tol: float = 1e-10) -> np.ndarray:
    """dx/dt = v(x, t) in float64 by scipy (DOP853), all rows as one system; ``v_fn(x (B, D), t) -> (B, D)``."""
    x = np.atleast_2d(np.asarray(x, dtype=np.float64))
    sol = solve_ivp(lambda t, y: v_fn(y.reshape(x.shape), t).reshape(-1), (t0, t1), x.reshape(-1),
                    method="DOP853", rtol=tol, atol=tol)
    assert sol.success, sol.message
    return sol.y[:, -1].reshape(x.shape)


def torch_fn(module, shape, call, cond=None):
    """A float64 numpy function x (B, D), label -> (B, D) of a float64 copy of ``module``:
    ``call(module, x (B, *shape), label (B,), cond (B,) or None) -> (B, *shape)``; ``cond`` one label per row."""
    m = copy.deepcopy(module).double().eval()
    c = None if cond is None else torch.as_tensor(np.asarray(cond), dtype=torch.int64)

    def fn(y, label):
        with torch.no_grad():
            x = torch.from_numpy(np.asarray(y, dtype=np.float64)).reshape(-1, *shape)
            out = call(m, x, torch.full((x.shape[0],), float(label), dtype=F64), c)
        return out.reshape(x.shape[0], -1).numpy()

    return fn
