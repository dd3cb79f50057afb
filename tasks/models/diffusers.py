"""``diffusers:DIR``: a local diffusers ``UNet2DModel`` + its scheduler config as a PF-ODE score model.

Layouts accepted (offline, safetensors only):

- pipeline: ``DIR/unet/{config.json, diffusion_pytorch_model.safetensors}`` + ``DIR/scheduler/scheduler_config.json``
- flat: ``DIR/{config.json, diffusion_pytorch_model.safetensors, scheduler_config.json}``

The mapping to the PF-ODE (exact at the trained noise levels):

- schedule: the scheduler's ``alphas_cumprod`` (as diffusers computes them from ``beta_schedule``,
  ``beta_start``, ``beta_end``, ``trained_betas``, ``num_train_timesteps`` = N) become a
  ``DiscreteVPSDE``: ``log alpha_bar`` piecewise linear in t through ``t = (i + 1)/N`` (see ``pflatents.tasks.ode.discrete``);
- time label: diffusers trains with ``add_noise(x0, eps, i)`` and calls ``unet(x_i, i)``, so the UNet is
  called with the (float) timestep ``i = t N - 1``;
- ``prediction_type``: ``epsilon`` -> ``EpsScore``; ``v_prediction`` (v = alpha eps - sigma x0, diffusers'
  ``get_velocity``) -> ``VScore``; ``sample`` -> ``X0Score``. Learned-variance UNets (2C output channels)
  use the first C channels, as diffusers' schedulers do.
- ``clip_sample`` and ``thresholding`` belong to the scheduler's sampling step, which is never called:
  they are not applied (they would break invertibility).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from pflatents.tasks.models.adapters import DeviceNet, X0Score
from pflatents.tasks.errors import ModelError
from pflatents.tasks.models.scores import EpsScore, VScore
from pflatents.tasks.ode.discrete import DiscreteVPSDE

__all__ = ["load_diffusers", "diffusers_sde", "find_layout", "PREDICTION_TYPES"]

WEIGHTS = "diffusion_pytorch_model.safetensors"
PREDICTION_TYPES = {"epsilon": EpsScore, "v_prediction": VScore, "sample": X0Score}
# schedulers whose training noise is the DDPM one (alphas_cumprod from betas); others are refused
DDPM_FAMILY = {"DDPMScheduler", "DDIMScheduler", "PNDMScheduler", "EulerDiscreteScheduler",
               "EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler",
               "LMSDiscreteScheduler", "HeunDiscreteScheduler", "KDPM2DiscreteScheduler", "UniPCMultistepScheduler",
               "DEISMultistepScheduler", "DDPMParallelScheduler", "DDIMParallelScheduler"}


def find_layout(root: str | Path) -> tuple[Path, Path]:
    """(unet dir, scheduler config file) of a pipeline or flat layout; clear errors otherwise."""
    root = Path(root)
    if not root.is_dir():
        raise ModelError(f"diffusers model directory not found: {root}")
    for unet_dir, sched in ((root / "unet", root / "scheduler" / "scheduler_config.json"),
                            (root, root / "scheduler_config.json")):
        if (unet_dir / "config.json").is_file():
            if not sched.is_file():
                raise ModelError(f"diffusers model {root}: no scheduler config (looked for {sched}); the "
                                 "noise schedule and prediction_type come from it")
            if not (unet_dir / WEIGHTS).is_file():
                pickled = sorted(p.name for p in unet_dir.glob("*.bin")) + sorted(p.name for p in unet_dir.glob("*.pt*"))
                hint = (f"; found only {', '.join(pickled)} (pickle, refused: it can execute code; convert it to "
                        "safetensors with diffusers' save_pretrained(safe_serialization=True) in a trusted environment)"
                        if pickled else "")
                raise ModelError(f"diffusers model {root}: missing {unet_dir / WEIGHTS}{hint}")
            return unet_dir, sched
    raise ModelError(f"{root} is not a diffusers UNet2DModel directory: expected unet/config.json + "
                     "scheduler/scheduler_config.json, or config.json + scheduler_config.json")


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


def _scheduler_info(sched_path: Path) -> tuple[DiscreteVPSDE, str, dict]:
    """The discrete VP SDE, prediction type and raw config of a scheduler config file."""
    cfg = _read_json(sched_path)
    cls = cfg.get("_class_name", "DDPMScheduler")
    if cls not in DDPM_FAMILY:
        raise ModelError(f"{sched_path}: scheduler {cls} is not a DDPM-type (betas / alphas_cumprod) schedule; "
                         f"supported: {', '.join(sorted(DDPM_FAMILY))}")
    pred = cfg.get("prediction_type", "epsilon")
    if pred not in PREDICTION_TYPES:
        raise ModelError(f"{sched_path}: prediction_type {pred!r} is not supported; expected one of "
                         f"{', '.join(PREDICTION_TYPES)}")
    diffusers = _import_diffusers()
    keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "rescale_betas_zero_snr")
    try:
        sch = diffusers.DDPMScheduler(**{k: cfg[k] for k in keys if k in cfg})
    except (NotImplementedError, ValueError, TypeError) as e:
        raise ModelError(f"{sched_path}: cannot build the noise schedule: {e}") from None
    # exactly the float32 alphas_cumprod diffusers trains with, widened to float64
    sde = DiscreteVPSDE(alphas_cumprod=tuple(sch.alphas_cumprod.double().tolist()))
    return sde, pred, cfg


def diffusers_sde(root: str | Path) -> DiscreteVPSDE:
    """The SDE of a diffusers model directory (from its scheduler config)."""
    return _scheduler_info(find_layout(root)[1])[0]


def _unet_call(n_channels: int):
    def call(unet, x, timestep, cond=None):
        out = (unet(x, timestep) if cond is None else unet(x, timestep, class_labels=cond)).sample
        return out[:, :n_channels] if out.shape[1] == 2 * n_channels else out
    return call


def load_diffusers(root: str | Path, sde=None) -> EpsScore:
    """The score model of a local diffusers UNet2DModel; offline, safetensors only."""
    unet_dir, sched_path = find_layout(root)
    ucfg = _read_json(unet_dir / "config.json")
    if ucfg.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise ModelError(f"{unet_dir}: only UNet2DModel (unconditional) is supported; got {ucfg.get('_class_name')}")
    native, pred, scfg = _scheduler_info(sched_path)
    if sde is not None and sde.to_dict() != native.to_dict():
        raise ModelError(f"diffusers model {root} defines its own discrete VP schedule; run it under that SDE "
                         f"(--sde vp selects it), not {sde.name}")
    diffusers = _import_diffusers()
    try:
        unet = diffusers.UNet2DModel.from_pretrained(str(unet_dir), use_safetensors=True, local_files_only=True)
    except (OSError, ValueError, RuntimeError, EnvironmentError) as e:
        raise ModelError(f"cannot load the UNet2DModel from {unet_dir}: {str(e).splitlines()[0]}") from None
    c = int(unet.config.in_channels)
    if unet.config.out_channels not in (c, 2 * c):
        raise ModelError(f"{unet_dir}: out_channels {unet.config.out_channels} must equal in_channels {c} (or 2x for learned variance)")
    size = unet.config.sample_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    score = PREDICTION_TYPES[pred](DeviceNet(unet, _unet_call(c)), native, time_fn=native.timestep)
    score.sample_shape = (c, h, w)
    score.dim = c * h * w
    score.prediction_type = pred
    h_ = hashlib.sha256((unet_dir / WEIGHTS).read_bytes())
    h_.update(json.dumps(ucfg, sort_keys=True).encode())
    h_.update(json.dumps(scfg, sort_keys=True).encode())
    score.content_hash = h_.hexdigest()
    return score
