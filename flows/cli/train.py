"""`pflatents train`: validate the flags and the data, then run the ``train`` flow with a progress bar."""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["register", "cmd_train", "build_train_config"]


def register(sub) -> None:
    """Add the ``train`` subcommand."""
    p = sub.add_parser("train", help="train a score network on a dataset and write a safetensors checkpoint")
    p.add_argument("--data", required=True, help="file.npy | store.zarr[/array] | images:DIR | imagefolder:DIR | "
                                                  "wds:PATTERN | parquet:PATH | sklearn:digits")
    p.add_argument("--out", required=True, help="checkpoint directory to write (model.safetensors + config.json)")
    p.add_argument("--arch", default="mlp", choices=["mlp", "unet"], help="mlp (flat data) or unet (C,H,W images)")
    p.add_argument("--steps", type=int, default=2000, help="optimisation steps (default 2000)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ema", type=float, default=0.999, help="EMA decay of the saved weights")
    p.add_argument("--time-sampling", default="logsnr", choices=["logsnr", "uniform"])
    p.add_argument("--sde", default="vp", choices=["vp", "ve", "edm"])
    p.add_argument("--t-eps", type=float, default=1e-5)
    p.add_argument("--hidden", type=int, default=None, help="mlp width (default 256)")
    p.add_argument("--depth", type=int, default=None, help="mlp residual blocks (default 3)")
    p.add_argument("--channels", type=int, default=None, help="unet base channels (default 32)")
    p.add_argument("--patience", type=int, default=0, help="early stop after this many steps without improvement")
    p.add_argument("--max-seconds", type=float, default=0.0, help="stop after this wall time (0 = no limit)")
    p.add_argument("--holdout", type=float, default=0.0,
                   help="hold out this fraction of the rows (seeded by --seed, recorded in the checkpoint) for analyze")
    p.add_argument("--device", default="auto",
                   help="auto | cpu | cuda[:N] (default auto: a GPU when torch sees one; there the forward pass "
                        "runs under bf16 autocast)")
    _add_source_args(p)
    p.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint at --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (the bar is on stderr)")
    p.add_argument("--json", action="store_true", help="print the checkpoint's config document as JSON (and nothing "
                   "else on stdout)")
    p.set_defaults(func=cmd_train)


def _add_source_args(p: argparse.ArgumentParser) -> None:
    """The image-source flags of ``extract`` (same names, help and choices), but ``--image-channels``
    for extract's ``--channels`` (here ``--channels`` is the U-Net's width)."""
    from pflatents.flows.cli.common import flag_type
    from pflatents.tasks.config import SOURCE_OPTIONS, JobSettings

    for name in SOURCE_OPTIONS:
        f = JobSettings.model_fields[name]
        flag = "--image-channels" if name == "channels" else "--" + name.replace("_", "-")
        if f.annotation is bool:
            p.add_argument(flag, dest=f"source_{name}", action="store_true", default=None, help=f.description)
            continue
        kind, choices = flag_type(f.annotation)
        help_ = "image sources: 3 (RGB, the default) or 1 (grey)" if name == "channels" else f.description
        p.add_argument(flag, dest=f"source_{name}", type=kind, choices=choices, default=None, help=help_,
                       metavar=None if choices else name.upper())


def source_options(a: argparse.Namespace) -> dict:
    """The image-source options given on the command line."""
    from pflatents.tasks.config import SOURCE_OPTIONS

    return {k: getattr(a, f"source_{k}") for k in SOURCE_OPTIONS if getattr(a, f"source_{k}", None) is not None}


def build_train_config(a: argparse.Namespace):
    """A validated TrainConfig from the parsed arguments."""
    from pflatents.tasks.training.train import TrainConfig

    params: dict = {}
    if a.arch == "mlp":
        params.update({k: v for k, v in (("hidden", a.hidden), ("depth", a.depth)) if v is not None})
    elif a.channels is not None:
        params["base"] = a.channels
    for name in ("hidden", "depth", "channels"):
        v = getattr(a, name)
        if v is not None and v < 1:
            from pflatents.tasks.errors import InputError

            raise InputError(f"--{name} must be >= 1; got {v}")
    return TrainConfig(arch=a.arch, arch_params=params, steps=a.steps, batch_size=a.batch_size, lr=a.lr,
                       ema_decay=a.ema, time_sampling=a.time_sampling, t_eps=a.t_eps, seed=a.seed,
                       patience=a.patience, max_seconds=a.max_seconds)


def cmd_train(a: argparse.Namespace) -> int:
    """Validate, then run the train flow with a progress bar; prints where the checkpoint is."""
    from pflatents.flows.coordinator import data_spec
    from pflatents.flows.train import run_train
    from pflatents.tasks.data.sources import open_source
    from pflatents.tasks.errors import InputError
    from pflatents.tasks.models.registry import resolve_device
    from pflatents.tasks.ode.sde import make_sde

    cfg = build_train_config(a)
    device = str(resolve_device(a.device))
    sde = make_sde(a.sde)
    sde.check_t_eps(a.t_eps)
    src = open_source(data_spec(a.data), **source_options(a))
    src.check_finite()
    skipped = getattr(src, "skipped", None)
    if skipped:
        print(f"skipped {len(skipped)} unreadable image(s) (--skip-bad; listed in the checkpoint's config.json): "
              + "; ".join(f"{sid} ({why})" for sid, why in skipped[:20]))
    if a.holdout:
        from pflatents.tasks.data.split import holdout_split

        holdout_split(len(src), a.holdout, a.seed)  # refuses a fraction that leaves no row on a side
    if cfg.arch == "unet" and len(src.sample_shape) != 3:
        raise InputError(f"--arch unet needs image samples (C, H, W); {a.data} has sample shape "
                         f"{tuple(src.sample_shape)} (use --arch mlp)")
    out = Path(a.out).expanduser().resolve()
    if out.exists() and not a.overwrite:
        raise InputError(f"{out} already exists; pass --overwrite to replace it")
    if out.exists() and not out.is_dir():
        raise InputError(f"{out} is a file, not a checkpoint directory")
    doc = run_train(src.spec, str(out), cfg.to_dict(), sde.to_dict(), overwrite=a.overwrite,
                    progress=not a.no_progress, holdout=a.holdout, device=device, data_options=src.options)
    if a.json:
        import json

        print(json.dumps({"checkpoint": str(out), **doc}, indent=2, default=str))
        return 0
    s = doc["summary"]
    print(f"trained {doc['network']['arch']} for {s['steps_done']} steps in {doc['provenance']['seconds']:.1f} s "
          f"on {doc['provenance'].get('device', 'cpu')} "
          f"(loss {s['loss_first_100']:.4f} -> {s['loss_last_100']:.4f}) -> {out}")
    print(f"content hash {doc['content_hash']}; use it as: pflatents extract --model {out} ...")
    return 0
