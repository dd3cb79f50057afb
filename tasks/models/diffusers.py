"""``diffusers:DIR``: a local diffusers model folder as a PF-ODE model (offline, safetensors only).

Layouts accepted (as ``save_pretrained`` writes them):

- pipeline: ``DIR/unet/`` or ``DIR/transformer/`` (``config.json`` + ``diffusion_pytorch_model.safetensors``),
  ``DIR/scheduler/scheduler_config.json``, and optionally ``DIR/vae/`` (a latent diffusion model);
- flat: ``DIR/{config.json, diffusion_pytorch_model.safetensors, scheduler_config.json}``.

Networks: ``UNet2DModel`` (unconditional, or class-conditional through ``num_class_embeds``),
``DiTTransformer2DModel`` and a DiT-style ``Transformer2DModel`` (``norm_type="ada_norm_zero"``,
``num_embeds_ada_norm`` classes), both class-conditional. A class-conditional network is called with
``class_labels`` = the row's label (``cond``) at every evaluation, as diffusers' pipelines do without
classifier-free guidance (guidance mixes two scores and is not the PF-ODE of any one distribution).

Schedules (the scheduler config), mapped exactly onto a PF-ODE:

- DDPM type (``betas`` / ``alphas_cumprod``: DDPM, DDIM, PNDM, Euler, DPM-Solver, ...): the scheduler's
  ``alphas_cumprod`` become a ``DiscreteVPSDE`` (``log alpha_bar`` piecewise linear in t through
  ``t = (i + 1)/N``, ``pflatents.tasks.ode.discrete``); the network gets the (float) timestep
  ``i = t N - 1``. ``prediction_type``: ``epsilon`` -> ``EpsScore``; ``v_prediction``
  (v = alpha eps - sigma x0) -> ``VScore``; ``sample`` -> ``X0Score``.
- flow matching (``FlowMatchEulerDiscreteScheduler``, ``FlowMatchHeunDiscreteScheduler``): the ``flow``
  SDE (x_t = (1 - t) x0 + t eps), the network predicts the velocity eps - x0 (``VelocityScore``) and gets
  ``timestep = t * num_train_timesteps``; ``shift`` only moves diffusers' sampling grid.

Learned-variance networks (2C output channels, e.g. DiT) use the first C channels, as diffusers'
schedulers do. ``clip_sample`` and ``thresholding`` belong to the scheduler's sampling step, which is
never called: they are not applied (they would break invertibility).

Latent diffusion (``DIR/vae/``: ``AutoencoderKL`` or ``VQModel``): the PF-ODE runs in the VAE's latent
space. Data (pixels in [-1, 1]) -> ``(posterior mean - shift_factor) * scaling_factor`` (deterministic;
a VQModel's pre-quantisation latents) -> PF-ODE latent; a decoded latent goes back through
``vae.decode(z / scaling_factor + shift_factor)`` (a VQModel quantises there, as its pipeline does).
``data_shape`` is the pixel shape, ``latent_shape`` the network's.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from pflatents.tasks.core import Cond, check_cond
from pflatents.tasks.errors import DataError, ModelError
from pflatents.tasks.models.adapters import DeviceNet, X0Score
from pflatents.tasks.models.flow import VelocityScore
from pflatents.tasks.models.scores import EpsScore, ModelBase, VScore
from pflatents.tasks.ode.discrete import DiscreteVPSDE
from pflatents.tasks.ode.sde import SDE, FlowSDE

__all__ = ["load_diffusers", "diffusers_sde", "find_layout", "Layout", "LatentModel", "PREDICTION_TYPES"]

WEIGHTS = "diffusion_pytorch_model.safetensors"
PREDICTION_TYPES = {"epsilon": EpsScore, "v_prediction": VScore, "sample": X0Score, "flow": VelocityScore}
# schedulers whose training noise is the DDPM one (alphas_cumprod from betas)
DDPM_FAMILY = {"DDPMScheduler", "DDIMScheduler", "PNDMScheduler", "EulerDiscreteScheduler",
               "EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler",
               "LMSDiscreteScheduler", "HeunDiscreteScheduler", "KDPM2DiscreteScheduler", "UniPCMultistepScheduler",
               "DEISMultistepScheduler", "DDPMParallelScheduler", "DDIMParallelScheduler"}
# schedulers of flow-matching models: x_t = (1 - sigma) x0 + sigma eps, velocity eps - x0, timestep = 1000 sigma
FLOW_FAMILY = {"FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler"}
NETWORKS = ("UNet2DModel", "DiTTransformer2DModel", "Transformer2DModel")
VAES = ("AutoencoderKL", "VQModel")


@dataclass(frozen=True)
class Layout:
    """Where a model folder keeps its parts: the network, the scheduler config and (latent models) the VAE."""

    root: Path
    net_dir: Path
    scheduler: Path
    vae_dir: Optional[Path] = None


def _weights(d: Path, root: Path, what: str) -> None:
    if not (d / WEIGHTS).is_file():
        pickled = sorted(p.name for p in d.glob("*.bin")) + sorted(p.name for p in d.glob("*.pt*"))
        hint = (f"; found only {', '.join(pickled)} (pickle, refused: it can execute code; convert it to "
                "safetensors with diffusers' save_pretrained(safe_serialization=True) in a trusted environment)"
                if pickled else "")
        raise ModelError(f"diffusers model {root}: missing the {what}'s weights {d / WEIGHTS}{hint}")


def find_layout(root: str | Path) -> Layout:
    """The parts of a pipeline or flat layout; clear errors otherwise."""
    root = Path(root)
    if not root.is_dir():
        raise ModelError(f"diffusers model directory not found: {root}")
    for net_dir, sched in ((root / "unet", root / "scheduler" / "scheduler_config.json"),
                           (root / "transformer", root / "scheduler" / "scheduler_config.json"),
                           (root, root / "scheduler_config.json")):
        if (net_dir / "config.json").is_file():
            if not sched.is_file():
                raise ModelError(f"diffusers model {root}: no scheduler config (looked for {sched}); the "
                                 "noise schedule and prediction_type come from it")
            _weights(net_dir, root, "network")
            vae = root / "vae" if net_dir != root and (root / "vae" / "config.json").is_file() else None
            if vae is not None:
                _weights(vae, root, "VAE")
            return Layout(root, net_dir, sched, vae)
    raise ModelError(f"{root} is not a diffusers model directory: expected unet/ or transformer/ (config.json) with "
                     "scheduler/scheduler_config.json (and optionally vae/), or config.json + scheduler_config.json")


def _read_json(p: Path) -> dict:
    try:
        d = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"cannot read {p}: {e}") from None
    if not isinstance(d, dict):
        raise ModelError(f"{p} must hold a JSON object")
    return d


def _import_diffusers():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    try:
        import diffusers
    except ImportError:
        raise ModelError("diffusers models need the optional extra: pip install 'pflatents[diffusers]'") from None
    return diffusers


def _scheduler_info(sched_path: Path) -> tuple[SDE, str, dict]:
    """The SDE, prediction type and raw config of a scheduler config file."""
    cfg = _read_json(sched_path)
    cls = cfg.get("_class_name", "DDPMScheduler")
    if cls in FLOW_FAMILY:
        if cfg.get("invert_sigmas"):
            raise ModelError(f"{sched_path}: invert_sigmas=true (noise at sigma 0) is not supported")
        return FlowSDE(), "flow", cfg
    if cls not in DDPM_FAMILY:
        raise ModelError(f"{sched_path}: scheduler {cls} is neither a DDPM-type (betas / alphas_cumprod) nor a "
                         f"flow-matching schedule; supported: {', '.join(sorted(DDPM_FAMILY | FLOW_FAMILY))}")
    pred = cfg.get("prediction_type", "epsilon")
    if pred not in PREDICTION_TYPES or pred == "flow":
        raise ModelError(f"{sched_path}: prediction_type {pred!r} is not supported; expected one of "
                         "epsilon, v_prediction, sample")
    diffusers = _import_diffusers()
    keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "rescale_betas_zero_snr")
    try:
        sch = diffusers.DDPMScheduler(**{k: cfg[k] for k in keys if k in cfg})
    except (NotImplementedError, ValueError, TypeError) as e:
        raise ModelError(f"{sched_path}: cannot build the noise schedule: {e}") from None
    # exactly the float32 alphas_cumprod diffusers trains with, widened to float64
    sde = DiscreteVPSDE(alphas_cumprod=tuple(sch.alphas_cumprod.double().tolist()))
    return sde, pred, cfg


def diffusers_sde(root: str | Path) -> SDE:
    """The SDE of a diffusers model directory (from its scheduler config)."""
    return _scheduler_info(find_layout(root).scheduler)[0]


# ---- the network ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Net:
    """What the adapter needs to know of a network class: its call, channels, size and classes."""

    cls: str
    channels: int
    size: tuple[int, int]
    num_classes: Optional[int]


def _net_info(net_dir: Path, cfg: dict) -> _Net:
    cls = cfg.get("_class_name", "UNet2DModel")
    if cls == "UNet2DConditionModel":
        raise ModelError(f"{net_dir}: UNet2DConditionModel is conditioned on text embeddings "
                         "(encoder_hidden_states), which pflatents does not supply; supported: " + ", ".join(NETWORKS))
    if cls not in NETWORKS:
        raise ModelError(f"{net_dir}: network class {cls!r} is not supported; supported: {', '.join(NETWORKS)}")
    c = int(cfg.get("in_channels", 3 if cls == "UNet2DModel" else 4))
    out = cfg.get("out_channels") or c
    if out not in (c, 2 * c):
        raise ModelError(f"{net_dir}: out_channels {out} must equal in_channels {c} (or 2x for learned variance)")
    size = cfg.get("sample_size")
    if size is None:
        raise ModelError(f"{net_dir}: config.json has no sample_size; the sample shape comes from it")
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    if cls == "UNet2DModel":
        if cfg.get("class_embed_type") is not None:
            raise ModelError(f"{net_dir}: class_embed_type {cfg['class_embed_type']!r} takes class vectors, not class "
                             "indices; class-conditional UNet2DModels are supported through num_class_embeds")
        n = cfg.get("num_class_embeds")
    elif cls == "Transformer2DModel":
        if cfg.get("norm_type") != "ada_norm_zero" or not cfg.get("patch_size") or not cfg.get("num_embeds_ada_norm"):
            raise ModelError(f"{net_dir}: only DiT-style Transformer2DModels (patch_size, norm_type 'ada_norm_zero', "
                             f"num_embeds_ada_norm classes) are supported; got norm_type {cfg.get('norm_type')!r}")
        n = cfg["num_embeds_ada_norm"]
    else:
        n = cfg.get("num_embeds_ada_norm") or 1000
    return _Net(cls, c, (int(h), int(w)), None if n is None else int(n))


def _net_call(info: _Net):
    """fn(module, x, label[, cond]) for DeviceNet: the prediction's first C channels."""
    c, n, unet = info.channels, info.num_classes, info.cls == "UNet2DModel"

    def call(module, x, timestep, cond: Cond = None):
        if n is not None:
            check_cond(cond, n, f"this {info.cls}")
        if unet:
            out = module(x, timestep, class_labels=cond).sample
        else:
            out = module(x, timestep=timestep, class_labels=cond).sample
        return out[:, :c] if out.shape[1] == 2 * c else out

    return call


def _load_module(diffusers, cls: str, d: Path):
    try:
        return getattr(diffusers, cls).from_pretrained(str(d), use_safetensors=True, local_files_only=True)
    except (OSError, ValueError, RuntimeError, EnvironmentError, TypeError) as e:
        raise ModelError(f"cannot load the {cls} from {d}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def _hash_dir(h, d: Path) -> None:
    h.update((d / WEIGHTS).read_bytes())
    h.update(json.dumps(_read_json(d / "config.json"), sort_keys=True).encode())


# ---- latent diffusion ------------------------------------------------------------------------------

class LatentModel(ModelBase):
    """A model whose PF-ODE runs in a VAE's latent space: ``inner`` is the network's adapter in latent
    space, ``vae`` the autoencoder (called on the data's device at the network's precision).

    ``encode_data``: pixels -> ``(posterior mean - shift) * scale``; ``decode_data``: the inverse map
    through the decoder. Everything else is the inner model's."""

    def __init__(self, inner, vae: DeviceNet, vae_cls: str, scale: float, shift: float,
                 data_shape: tuple[int, ...]) -> None:
        self.inner, self.vae, self.vae_cls = inner, vae, vae_cls
        self.scale, self.shift = float(scale), float(shift)
        self.sde = inner.sde
        self._data_shape = tuple(data_shape)
        self.sample_shape = tuple(inner.sample_shape)
        self.dim = math.prod(self.sample_shape)
        self.conditional = inner.conditional
        self.content_hash = ""

    @property
    def net(self):
        return self.inner.net

    @property
    def data_shape(self) -> tuple[int, ...]:
        return self._data_shape

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return self.sample_shape

    def with_settings(self, precision: Optional[str], compile: str = "off") -> "LatentModel":
        import copy

        model = copy.copy(self)
        model.inner = self.inner.with_settings(precision, compile)
        model.vae = self.vae.with_settings(precision, "off")
        return model

    def sigma2_score(self, x: torch.Tensor, t: torch.Tensor, cond: Cond = None) -> torch.Tensor:
        return self.inner.sigma2_score(x, t, cond)

    def velocity(self, x: torch.Tensor, t: torch.Tensor, cond: Cond = None) -> torch.Tensor:
        return self.inner.velocity(x, t, cond)  # a latent flow model's own velocity (finite at t = 1)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: Cond = None) -> torch.Tensor:
        return self.inner(x, t, cond)

    def encode_data(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[1:]) != self._data_shape:
            raise DataError(f"this latent diffusion model's VAE takes images of shape {self._data_shape} "
                            f"(channels, height, width); got samples of shape {tuple(x.shape[1:])}")
        return self.vae(x, torch.zeros(x.shape[0], dtype=torch.float64, device=x.device), _ENCODE)

    def decode_data(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae(z, torch.zeros(z.shape[0], dtype=torch.float64, device=z.device), _DECODE)


_ENCODE, _DECODE = 0, 1


def _vae_call(cls: str, scale: float, shift: float):
    """fn(module, x, unused label, direction) for DeviceNet: encode (direction 0) or decode (1)."""

    def call(module, x, _label, direction):
        if direction is _ENCODE:
            if cls == "VQModel":
                h = module.encode(x).latents
            else:
                h = module.encode(x).latent_dist.mean
            return (h - shift) * scale
        return module.decode(x / scale + shift).sample

    return call


class _VaeNet(DeviceNet):
    """DeviceNet whose third argument is the direction (not a tensor of labels)."""

    def __call__(self, x, label, direction):  # type: ignore[override]
        dev = torch.device(x.device)
        m = self.on(dev)
        from pflatents.tasks.models import precision as P

        with P.matmul_flags(self.precision, dev), P.autocast(self.precision, dev):
            out = self.fn(m, x.to(self.dtype), label, direction)
        return out.to(x.dtype).contiguous()

    def with_settings(self, precision, compile="off"):
        return _VaeNet(self.module, self.fn, precision, "off")


def _load_vae(diffusers, layout: Layout, latent_channels: int, precision=None) -> tuple[_VaeNet, str, float, float, tuple]:
    vcfg = _read_json(layout.vae_dir / "config.json")
    cls = vcfg.get("_class_name", "AutoencoderKL")
    if cls not in VAES:
        raise ModelError(f"{layout.vae_dir}: VAE class {cls!r} is not supported; supported: {', '.join(VAES)}")
    vae = _load_module(diffusers, cls, layout.vae_dir)
    lc = int(vae.config.latent_channels) if cls == "AutoencoderKL" else int(vae.config.vq_embed_dim or vae.config.latent_channels)
    if lc != latent_channels:
        raise ModelError(f"{layout.root}: the VAE has {lc} latent channels but the network takes {latent_channels}")
    scale = float(vae.config.scaling_factor if vae.config.scaling_factor is not None else 1.0)
    shift = float(getattr(vae.config, "shift_factor", None) or 0.0)
    return _VaeNet(vae, _vae_call(cls, scale, shift)), cls, scale, shift, tuple(vcfg.get("block_out_channels", ()))


# ---- loading ---------------------------------------------------------------------------------------

def load_diffusers(root: str | Path, sde=None):
    """The model of a local diffusers folder (``pflatents.tasks.core.Model``); offline, safetensors only."""
    layout = find_layout(root)
    ncfg = _read_json(layout.net_dir / "config.json")
    info = _net_info(layout.net_dir, ncfg)
    native, pred, scfg = _scheduler_info(layout.scheduler)
    if sde is not None and sde.to_dict() != native.to_dict():
        flag = "vp" if native.name == "vp_discrete" else native.name
        raise ModelError(f"diffusers model {root} defines its own {native.name} schedule; run it under that SDE "
                         f"(--sde {flag} selects it), not {sde.name}")
    diffusers = _import_diffusers()
    net = _load_module(diffusers, info.cls, layout.net_dir)
    if pred == "flow":
        n_train = float(scfg.get("num_train_timesteps", 1000))
        time_fn = lambda t: t * n_train  # noqa: E731 -- diffusers' timestep = sigma * num_train_timesteps
    else:
        time_fn = native.timestep
    score = PREDICTION_TYPES[pred](DeviceNet(net, _net_call(info)), native, time_fn=time_fn)
    score.sample_shape = (info.channels, *info.size)
    score.dim = math.prod(score.sample_shape)
    score.prediction_type = pred
    score.conditional = info.num_classes is not None
    score.num_classes = info.num_classes
    h = hashlib.sha256()
    _hash_dir(h, layout.net_dir)
    h.update(json.dumps(scfg, sort_keys=True).encode())
    model = score
    if layout.vae_dir is not None:
        vae, vcls, scale, shift, _ = _load_vae(diffusers, layout, info.channels)
        factor = _vae_factor(vae.module, vcls)
        data_shape = (int(vae.module.config.in_channels), info.size[0] * factor, info.size[1] * factor)
        model = LatentModel(score, vae, vcls, scale, shift, data_shape)
        model.num_classes = info.num_classes
        model.prediction_type = pred
        _hash_dir(h, layout.vae_dir)
    model.content_hash = h.hexdigest()
    return model


def _vae_factor(vae, cls: str) -> int:
    """The VAE's spatial downsampling factor, measured on a tiny input (exact for any block layout)."""
    c = int(vae.config.in_channels)
    n = 2 ** len(vae.config.block_out_channels)
    with torch.no_grad():
        x = torch.zeros(1, c, n, n, dtype=next(vae.parameters()).dtype)
        h = vae.encode(x).latents if cls == "VQModel" else vae.encode(x).latent_dist.mean
    return n // int(h.shape[-1])
