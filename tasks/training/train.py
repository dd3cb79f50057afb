"""Denoising score matching (pure torch): train an eps-network under an SDE, with EMA weights.

Loss (Ho et al. 2020; Song et al. 2021, score_sde's ``reduce_mean`` eps loss): ``E || eps_hat(alpha x0 +
sigma eps, s) - eps ||^2``, i.e. score matching with weight ``sigma(t)^2``. Time sampling, one of

- ``logsnr`` (default): ``s = log(sigma/alpha)`` uniform on ``[s(t_eps), s(T)]`` -- the PF-ODE is
  integrated on (near-)uniform steps in ``s``, so every stretch of it is trained as often as it is used;
- ``uniform``: ``t ~ U(t_eps, T)`` as in score_sde.

Reproducible on CPU: one ``torch.Generator`` seeds the initialisation, batches and noise, so the same
seed and settings give bit-identical weights. ``fit`` reports progress through a callback.

Device: ``fit(..., device=...)`` trains on a GPU with the data held on the device, batches and noise
drawn from a generator on that device (seeded the same way), and the network's forward pass under
bfloat16 autocast (weights, optimiser state and the loss stay float32). The initial weights are
built on the CPU, so they do not depend on the device. The CPU path is the same computation as
before the device option existed (bitwise, tested). The device is recorded in the checkpoint's
provenance, outside the content hash.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
import torch

from pflatents.tasks.errors import InputError
from pflatents.tasks.models.networks import ARCHS, GaussianPrecond, build_network
from pflatents.tasks.ode.sde import SDE

__all__ = ["TrainConfig", "TrainResult", "fit", "family_of", "TIME_SAMPLING"]

TIME_SAMPLING = ("logsnr", "uniform")
F64 = torch.float64


def family_of(sde: SDE) -> str:
    """'vp' when alpha^2 + sigma^2 = 1 (vp, vp_discrete), 've' when alpha = 1 (ve, edm)."""
    if sde.name in ("vp", "vp_discrete"):
        return "vp"
    if sde.name in ("ve", "edm"):
        return "ve"
    raise InputError(f"cannot train under the {sde.name!r} SDE")


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides the trained weights (hashable, JSON-able)."""

    arch: str = "mlp"
    arch_params: dict = field(default_factory=dict)
    steps: int = 2000
    batch_size: int = 256
    lr: float = 2e-3
    warmup: int = 100
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    time_sampling: str = "logsnr"
    t_eps: float = 1e-5
    seed: int = 0
    patience: int = 0          # early stop: stop when the smoothed loss has not improved for this many steps (0 = off)
    max_seconds: float = 0.0   # wall-clock budget (0 = none); makes the result depend on the machine

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise InputError(f"unknown architecture {self.arch!r}; choose one of {', '.join(ARCHS)}")
        for name in ("steps", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InputError(f"{name.replace('_', ' ')} must be an integer >= 1; got {v!r}")
        for name in ("warmup", "patience", "seed"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise InputError(f"{name} must be an integer >= 0; got {v!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise InputError(f"learning rate must be > 0; got {self.lr!r}")
        if not 0 <= self.ema_decay < 1:
            raise InputError(f"EMA decay must lie in [0, 1); got {self.ema_decay!r}")
        if self.time_sampling not in TIME_SAMPLING:
            raise InputError(f"unknown time sampling {self.time_sampling!r}; choose one of {', '.join(TIME_SAMPLING)}")
        if not (math.isfinite(self.t_eps) and self.t_eps > 0):
            raise InputError(f"t_eps must be > 0; got {self.t_eps!r}")
        if not (math.isfinite(self.max_seconds) and self.max_seconds >= 0):
            raise InputError(f"max seconds must be >= 0; got {self.max_seconds!r}")

    def to_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self)))

    def digest(self) -> str:
        """sha256 of the canonical JSON of the settings."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()


@dataclass
class TrainResult:
    """The EMA network (eval mode) and a JSON summary of the run."""

    net: GaussianPrecond
    summary: dict


Progress = Callable[[int, int, float], None]  # (step, total, smoothed loss)


def _sample_s(n: int, sde: SDE, cfg: TrainConfig, gen: torch.Generator) -> torch.Tensor:
    dev = gen.device
    u = torch.rand(n, generator=gen, dtype=F64, device=dev)
    if cfg.time_sampling == "uniform":
        return sde.s_of_t(cfg.t_eps + u * (sde.T - cfg.t_eps))
    s_lo = sde.s_of_t(torch.tensor(cfg.t_eps, dtype=F64, device=dev))
    s_hi = sde.s_of_t(torch.tensor(sde.T, dtype=F64, device=dev))
    return s_lo + u * (s_hi - s_lo)


def _lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to 10 % of lr at the last step."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    p = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, p))))


def dsm_loss(net: GaussianPrecond, x0: torch.Tensor, s: torch.Tensor, eps: torch.Tensor, family: str) -> torch.Tensor:
    """Mean over the batch of || eps_hat(alpha x0 + sigma eps, s) - eps ||^2 / D."""
    from pflatents.tasks.models.networks import alpha_sigma_of_s

    a, sg = alpha_sigma_of_s(s.to(torch.float32), family)
    shape = (-1, *([1] * (x0.ndim - 1)))
    x = a.reshape(shape) * x0 + sg.reshape(shape) * eps
    return ((net(x, s.to(torch.float32)) - eps) ** 2).mean()


def fit(data: np.ndarray, sde: SDE, cfg: TrainConfig, progress: Progress | None = None,
        device: str | torch.device = "cpu", amp: str | None = "auto") -> TrainResult:
    """Train an eps-network on ``data`` (N, *sample_shape) under ``sde``; returns the EMA network (on the CPU).

    ``device``: where to train (module docstring). ``amp``: ``"bf16"`` runs the forward pass under
    bfloat16 autocast, None in float32; ``"auto"`` is bf16 on CUDA and None elsewhere.
    """
    from pflatents.tasks.models.precision import autocast, matmul_flags

    dev = torch.device(device)
    if amp == "auto":
        amp = "bf16" if dev.type == "cuda" else None
    if amp not in (None, "bf16"):
        raise InputError(f"training autocast must be bf16 or none; got {amp!r}")
    data_t = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))
    n, sample_shape = data_t.shape[0], tuple(data_t.shape[1:])
    if n < 2:
        raise InputError(f"training needs at least 2 samples; got {n}")
    sde.check_t_eps(cfg.t_eps)
    family = family_of(sde)
    gen = torch.Generator(device=dev).manual_seed(cfg.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        try:
            net = build_network(cfg.arch, sample_shape, family, **cfg.arch_params)
        except (TypeError, ValueError) as e:
            raise InputError(f"bad architecture settings for {cfg.arch}: {e}") from None
    mean, var = data_t.to(F64).mean(0), data_t.to(F64).var(0, unbiased=False)
    net.set_data_stats(mean.float(), var.float())
    net = net.to(dev)
    data_t = data_t.to(dev)
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    t0, smooth, best, best_step, losses = time.perf_counter(), None, math.inf, 0, []
    step, stopped = 0, "steps"
    net.train()
    for step in range(cfg.steps):
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, cfg)
        idx = torch.randint(0, n, (cfg.batch_size,), generator=gen, device=dev)
        x0 = data_t[idx]
        s = _sample_s(cfg.batch_size, sde, cfg, gen)
        eps = torch.randn(x0.shape, generator=gen, device=dev)
        with matmul_flags(amp, dev):  # forward and backward; the process's flags restored after
            with autocast(amp, dev):
                loss = dsm_loss(net, x0, s, eps, family)
            opt.zero_grad(set_to_none=True)
            loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
        opt.step()
        _ema_update(ema, net, min(cfg.ema_decay, (1 + step) / (10 + step)))
        lv = loss.item()
        if not math.isfinite(lv):
            raise RuntimeError(f"training diverged at step {step}: loss {lv}; lower --lr")
        smooth = lv if smooth is None else 0.98 * smooth + 0.02 * lv
        losses.append(lv)
        if progress is not None:
            progress(step + 1, cfg.steps, smooth)
        if smooth < best * (1 - 1e-3):
            best, best_step = smooth, step
        if cfg.patience and step - best_step >= cfg.patience:
            stopped = "early_stop"
            break
        if cfg.max_seconds and time.perf_counter() - t0 >= cfg.max_seconds:
            stopped = "time_budget"
            break
    summary = {"steps_done": step + 1, "stopped": stopped, "final_loss_smoothed": smooth,
               "loss_first_100": float(np.mean(losses[:100])), "loss_last_100": float(np.mean(losses[-100:])),
               "n_train": n, "seconds": time.perf_counter() - t0}
    return TrainResult(net=ema.to("cpu"), summary=summary)


@torch.no_grad()
def _ema_update(ema: torch.nn.Module, net: torch.nn.Module, decay: float) -> None:
    for pe, p in zip(ema.parameters(), net.parameters()):
        pe.mul_(decay).add_(p.detach(), alpha=1 - decay)
    for be, b in zip(ema.buffers(), net.buffers()):
        be.copy_(b)


@torch.no_grad()
def eval_loss(net: GaussianPrecond, data: np.ndarray, sde: SDE, t_eps: float = 1e-5, n_s: int = 64,
              seed: int = 1234) -> float:
    """Held-out eps-MSE averaged over s uniform on [s(t_eps), s(T)] (a fixed, seeded estimate)."""
    cfg = TrainConfig(t_eps=t_eps, time_sampling="logsnr")
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))
    tot = 0.0
    for _ in range(n_s):
        s = _sample_s(x0.shape[0], sde, cfg, gen)
        eps = torch.randn(x0.shape, generator=gen)
        tot += float(dsm_loss(net, x0, s, eps, family_of(sde)))
    return tot / n_s


def _resolved_arch_params(arch: str, params: dict) -> dict:
    """The architecture's keyword defaults overlaid with ``params`` (so a checkpoint never depends on defaults)."""
    import inspect

    from pflatents.tasks.models.networks import MLPTrunk, UNetTrunk

    cls = MLPTrunk if arch == "mlp" else UNetTrunk
    skip = {"self", "dim", "channels"}
    out = {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items() if k not in skip}
    unknown = set(params) - set(out)
    if unknown:
        raise InputError(f"unknown {arch} parameter(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(out))}")
    out.update(params)
    return json.loads(json.dumps(out))


def train_checkpoint(source, sde: SDE, cfg: TrainConfig, out, progress: Progress | None = None,
                     overwrite: bool = False, device: str | torch.device = "cpu", holdout: float = 0.0) -> dict:
    """Train on the samples of ``source`` (all, or all but a seeded ``holdout`` fraction, recorded in
    ``data.holdout`` with the held-out eps-loss beside the training one) and write a checkpoint dir;
    returns its config document.

    Raises:
        InputError: bad settings, or a sample shape the architecture cannot take.
        ModelError: ``out`` exists and ``overwrite`` is false.
    """
    from pflatents.tasks.models.checkpoint import read_config, save_checkpoint

    shape = tuple(source.sample_shape)
    if cfg.arch == "unet" and len(shape) != 3:
        raise InputError(f"--arch unet needs image samples (C, H, W); {source.spec} has sample shape {shape} "
                         "(use --arch mlp)")
    params = _resolved_arch_params(cfg.arch, cfg.arch_params)
    cfg = TrainConfig(**{**asdict(cfg), "arch_params": params})
    data = source.read(0, len(source)).x
    split = None
    if holdout:
        from pflatents.tasks.data.split import holdout_split, split_record

        split = split_record(len(data), holdout, cfg.seed, source.fingerprint())
        train_rows, held_rows = holdout_split(len(data), holdout, cfg.seed)
        data, held = data[train_rows], data[held_rows]
    dev = torch.device(device)
    result = fit(data, sde, cfg, progress, device=dev)
    x = data.astype(np.float64)
    if split is not None:
        m, net = min(len(held), len(data), 4096), copy.deepcopy(result.net).to("cpu")
        split["eval_loss_heldout"] = eval_loss(net, held[:m], sde, cfg.t_eps)
        split["eval_loss_train"] = eval_loss(net, data[:m], sde, cfg.t_eps)
    doc = {
        "network": {"arch": cfg.arch, "params": params, "family": family_of(sde), "sample_shape": list(shape),
                    "prediction": "epsilon", "time_label": "s = log(sigma/alpha)",
                    "precond": "gaussian: eps = (sigma/d) y + (alpha sqrt(v)/d) F(y, s), y = (x - alpha mu)/d, "
                               "d = sqrt(alpha^2 v + sigma^2); mu, v = data_mean, data_var in model.safetensors"},
        "sde": sde.to_dict(),
        "data": {"spec": source.spec, "fingerprint": source.fingerprint(), "n_samples": len(source),
                 "sample_shape": list(shape), "quantization": source.quantization, **source.pinned(),
                 "normalisation": {"kind": "none: data used as is; per-dim mean/variance precondition the network",
                                   "mean": float(x.mean()), "std": float(x.std()),
                                   "per_dim_std_min": float(x.std(0).min()), "per_dim_std_max": float(x.std(0).max()),
                                   "constant_dims": int((x.std(0) == 0).sum())},
                 **({"holdout": split} if split is not None else {})},
        "train": cfg.to_dict(),
        "summary": {k: v for k, v in result.summary.items() if k != "seconds"},
        "provenance": {"seconds": round(result.summary["seconds"], 3), "torch": torch.__version__,
                       "threads": torch.get_num_threads(), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                       "device": str(dev), "autocast": "bf16" if dev.type == "cuda" else "none"},
    }
    save_checkpoint(out, result.net, doc, overwrite=overwrite)
    return read_config(out)
