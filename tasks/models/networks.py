"""Noise-prediction networks eps(x, s) for flat data (MLP) and images (small U-Net).

Both are called as ``net(x, s)`` with per-sample ``s = log(sigma/alpha)`` (the negative half log-SNR,
shape (B,)), so one network serves any schedule of its family (``vp``: alpha^2 + sigma^2 = 1;
``ve``: alpha = 1). Each wraps its trunk in the same exact Gaussian preconditioning
(``GaussianPrecond``): with per-dim data mean ``mu`` and variance ``v`` (buffers, saved with the
weights), ``d = sqrt(alpha^2 v + sigma^2)``,

    eps_hat = (sigma / d) y + (alpha sqrt(v) / d) F(y, emb(s)),   y = (x - alpha mu) / d,

the first term being the exact noise prediction for Gaussian data N(mu, diag v) and the second a
learned correction at its natural scale (zero where v = 0, e.g. constant pixels). ``F``'s last layer
starts at zero, so an untrained network is the per-dim Gaussian model.

Precision: the trunk runs in its weights' dtype. A float64 time label ``s`` (what the ODE passes;
``takes_float64_label``) is never rounded to the weights' dtype before use: alpha, sigma, d, the
preconditioning and the embedding's phase ``w_k s`` are computed in float64 and only the results are
cast (sin/cos to the trunk's dtype, eps to the input's dtype). A float32 label (training) takes the
float32 path unchanged, so training results do not depend on this.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["GaussianPrecond", "MLPTrunk", "UNetTrunk", "build_network", "ARCHS", "alpha_sigma_of_s"]


def alpha_sigma_of_s(s: torch.Tensor, family: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha, sigma) from s = log(sigma/alpha): VP alpha^2 = sigmoid(-2s); VE alpha = 1."""
    if family == "vp":
        return torch.sigmoid(-2.0 * s).sqrt(), torch.sigmoid(2.0 * s).sqrt()
    return torch.ones_like(s), torch.exp(s)


class SinusoidalEmbedding(nn.Module):
    """[sin(w_k s), cos(w_k s)] with w_k log-spaced over [w_min, w_max] (Transformer / NCSN++ style)."""

    def __init__(self, dim: int, w_min: float = 1.0 / 16, w_max: float = 16.0) -> None:
        super().__init__()
        half = dim // 2
        w = torch.exp(torch.linspace(math.log(w_min), math.log(w_max), half))
        self.register_buffer("w", w, persistent=False)

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        # the phase in s's dtype (float64 labels are not rounded first); the result in the weights' dtype
        a = s[:, None] * self.w.to(s.dtype)[None]
        return torch.cat([torch.sin(a), torch.cos(a)], dim=1).to(self.w.dtype)


class TimeMLP(nn.Module):
    """Embedding of s -> a conditioning vector."""

    def __init__(self, emb_dim: int, out_dim: int) -> None:
        super().__init__()
        self.emb = SinusoidalEmbedding(emb_dim)
        self.net = nn.Sequential(nn.Linear(emb_dim, out_dim), nn.SiLU(), nn.Linear(out_dim, out_dim))

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        return self.net(self.emb(s))


class MLPTrunk(nn.Module):
    """Residual MLP on flat data: h <- h + W2 SiLU(W1 LN(h) + E(s))."""

    def __init__(self, dim: int, hidden: int = 256, depth: int = 3, emb_dim: int = 64) -> None:
        super().__init__()
        self.inp = nn.Linear(dim, hidden)
        self.time = TimeMLP(emb_dim, hidden)
        self.norms = nn.ModuleList(nn.LayerNorm(hidden) for _ in range(depth))
        self.lin1 = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(depth))
        self.temb = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(depth))
        self.lin2 = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(depth))
        self.out = nn.Linear(hidden, dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, y: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        shape = y.shape
        h = self.inp(y.reshape(shape[0], -1))
        e = nn.functional.silu(self.time(s))
        for norm, l1, te, l2 in zip(self.norms, self.lin1, self.temb, self.lin2):
            h = h + l2(nn.functional.silu(l1(norm(h)) + te(e)))
        return self.out(nn.functional.silu(h)).reshape(shape)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv x2 with the time embedding added in between (DDPM U-Net block)."""

    def __init__(self, c_in: int, c_out: int, t_dim: int, groups: int) -> None:
        super().__init__()
        self.n1, self.c1 = nn.GroupNorm(min(groups, c_in), c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.t = nn.Linear(t_dim, c_out)
        self.n2, self.c2 = nn.GroupNorm(min(groups, c_out), c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        h = self.c1(nn.functional.silu(self.n1(x))) + self.t(e)[:, :, None, None]
        h = self.c2(nn.functional.silu(self.n2(h)))
        return self.skip(x) + h


class UNetTrunk(nn.Module):
    """A small U-Net on (C, H, W): one ResBlock per level, stride-2 down / nearest up, skip concat."""

    def __init__(self, channels: int, base: int = 32, mults: tuple[int, ...] = (1, 2), emb_dim: int = 64,
                 groups: int = 8) -> None:
        super().__init__()
        t_dim = base * 4
        self.time = TimeMLP(emb_dim, t_dim)
        chs = [base * m for m in mults]
        self.inp = nn.Conv2d(channels, chs[0], 3, padding=1)
        self.down = nn.ModuleList()
        self.pool = nn.ModuleList()
        c = chs[0]
        for i, co in enumerate(chs):
            self.down.append(ResBlock(c, co, t_dim, groups))
            c = co
            self.pool.append(nn.Conv2d(c, c, 3, stride=2, padding=1) if i < len(chs) - 1 else nn.Identity())
        self.mid = ResBlock(c, c, t_dim, groups)
        self.up = nn.ModuleList()
        for co in reversed(chs):
            self.up.append(ResBlock(c + co, co, t_dim, groups))
            c = co
        self.out_norm = nn.GroupNorm(min(groups, c), c)
        self.out = nn.Conv2d(c, channels, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, y: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        e = nn.functional.silu(self.time(s))
        h = self.inp(y)
        skips = []
        for block, pool in zip(self.down, self.pool):
            h = block(h, e)
            skips.append(h)
            h = pool(h)
        h = self.mid(h, e)
        for block in self.up:
            skip = skips.pop()
            if h.shape[-2:] != skip.shape[-2:]:
                h = nn.functional.interpolate(h, size=skip.shape[-2:], mode="nearest")
            h = block(torch.cat([h, skip], dim=1), e)
        return self.out(nn.functional.silu(self.out_norm(h)))


class GaussianPrecond(nn.Module):
    """eps_hat(x, s) = (sigma/d) y + (alpha sqrt(v)/d) F(y, s), y = (x - alpha mu)/d (module docstring)."""

    def __init__(self, trunk: nn.Module, sample_shape: tuple[int, ...], family: str = "vp") -> None:
        super().__init__()
        if family not in ("vp", "ve"):
            raise ValueError(f"unknown SDE family {family!r}")
        self.trunk, self.family, self.sample_shape = trunk, family, tuple(sample_shape)
        self.register_buffer("data_mean", torch.zeros(self.sample_shape))
        self.register_buffer("data_var", torch.ones(self.sample_shape))

    def set_data_stats(self, mean: torch.Tensor, var: torch.Tensor) -> None:
        """Record the training data's per-dim mean and variance (part of the saved weights)."""
        self.data_mean.copy_(mean.reshape(self.sample_shape))
        self.data_var.copy_(var.clamp_min(0).reshape(self.sample_shape))

    def forward(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        wdt = self.data_mean.dtype  # the weights' dtype: the trunk runs in it
        s = torch.as_tensor(s, device=x.device)
        s = (s if s.is_floating_point() else s.to(torch.float64)).expand(x.shape[0])
        cd = torch.float64 if torch.float64 in (s.dtype, wdt) else wdt  # preconditioning dtype
        a, sg = alpha_sigma_of_s(s.to(cd), self.family)
        a, sg = a.reshape(-1, *([1] * (x.ndim - 1))), sg.reshape(-1, *([1] * (x.ndim - 1)))
        var = self.data_var.to(cd)
        d = torch.sqrt(a * a * var + sg * sg)
        y = (x.to(cd) - a * self.data_mean.to(cd)) / d
        eps = (sg / d) * y + (a * var.sqrt() / d) * self.trunk(y.to(wdt), s).to(cd)
        return eps.to(x.dtype)

    takes_float64_label = True  # callers (DeviceNet) pass the time label unrounded (module docstring)


ARCHS = ("mlp", "unet")


def build_network(arch: str, sample_shape: tuple[int, ...], family: str = "vp", **params) -> GaussianPrecond:
    """An eps-network by name: 'mlp' (flat data, any shape is flattened) or 'unet' (C, H, W)."""
    if arch == "mlp":
        dim = math.prod(sample_shape)
        trunk: nn.Module = MLPTrunk(dim, **params)
    elif arch == "unet":
        if len(sample_shape) != 3:
            raise ValueError(f"the unet needs image samples (C, H, W); got sample shape {tuple(sample_shape)}")
        if "mults" in params:
            params = {**params, "mults": tuple(params["mults"])}
        trunk = UNetTrunk(sample_shape[0], **params)
    else:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHS)}")
    return GaussianPrecond(trunk, sample_shape, family)
