"""``pflatents train``: fit a score network to a dataset and write a safetensors checkpoint (a Prefect flow).

The checkpoint directory (``model.safetensors`` + ``config.json``) is a MODEL for ``extract`` and
``analyze``. Inputs are validated before Prefect starts; progress (step, loss) shows as a rich bar.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Callable

__all__ = ["register", "cmd_train", "run_train", "hooks", "build_train_config"]  # + the flow `train` (lazy)

# Process-local progress callbacks (step, total, loss), registered by the CLI around a flow run.
hooks: list[Callable[[int, int, float], None]] = []


def register(sub) -> dict:
    """Add the ``train`` subcommand; returns {"train": handler}."""
    p = sub.add_parser("train", help="train a score network on a dataset and write a safetensors checkpoint")
    p.add_argument("--data", required=True, help="file.npy | store.zarr[/array] | images:DIR | sklearn:digits")
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
    p.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint at --out")
    p.add_argument("--no-progress", action="store_true")
    return {"train": cmd_train}


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


def _data_spec(spec: str) -> str:
    from pflatents.flows.coordinator import data_spec

    return data_spec(spec)


def cmd_train(a: argparse.Namespace) -> int:
    """Validate, then run the train flow with a progress bar; prints where the checkpoint is."""
    from pflatents.tasks.errors import InputError
    from pflatents.tasks.ode.sde import make_sde
    from pflatents.tasks.data.sources import open_source

    cfg = build_train_config(a)
    sde = make_sde(a.sde)
    sde.check_t_eps(a.t_eps)
    src = open_source(_data_spec(a.data))
    src.check_finite()
    if cfg.arch == "unet" and len(src.sample_shape) != 3:
        raise InputError(f"--arch unet needs image samples (C, H, W); {a.data} has sample shape "
                         f"{tuple(src.sample_shape)} (use --arch mlp)")
    out = Path(a.out).expanduser().resolve()
    if out.exists() and not a.overwrite:
        raise InputError(f"{out} already exists; pass --overwrite to replace it")
    if out.exists() and not out.is_dir():
        raise InputError(f"{out} is a file, not a checkpoint directory")
    doc = run_train(src.spec, str(out), cfg.to_dict(), sde.to_dict(), overwrite=a.overwrite,
                    progress=not a.no_progress)
    s = doc["summary"]
    print(f"trained {doc['network']['arch']} for {s['steps_done']} steps in {doc['provenance']['seconds']:.1f} s "
          f"(loss {s['loss_first_100']:.4f} -> {s['loss_last_100']:.4f}) -> {out}")
    print(f"content hash {doc['content_hash']}; use it as: pflatents extract --model {out} ...")
    return 0


def run_train(data_spec: str, out: str, cfg: dict, sde: dict, overwrite: bool = False, progress: bool = True) -> dict:
    """Run the Prefect ``train`` flow (with a rich progress bar unless disabled); returns the checkpoint config."""
    from pflatents.flows.cli import _prefect_env

    _prefect_env()
    with _Bar(cfg["steps"], disabled=not progress) as hook:
        hooks.append(hook)
        try:
            return _flow()(data_spec=data_spec, out=out, cfg=cfg, sde=sde, overwrite=overwrite)
        finally:
            hooks.remove(hook)


class _Bar:
    """A rich progress bar over steps showing the smoothed loss."""

    def __init__(self, total: int, disabled: bool) -> None:
        self.total, self.disabled = total, disabled

    def __enter__(self):
        if self.disabled:
            return lambda step, total, loss: None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.p = Progress(TextColumn("training"), BarColumn(), MofNCompleteColumn(),
                          TextColumn("loss {task.fields[loss]}"), TimeRemainingColumn())
        self.p.start()
        self.tid = self.p.add_task("train", total=self.total, loss="-")
        last = [0.0]

        def hook(step: int, total: int, loss: float) -> None:
            now = time.monotonic()
            if now - last[0] > 0.1 or step == total:
                last[0] = now
                self.p.update(self.tid, completed=step, loss=f"{loss:.4f}")
        return hook

    def __exit__(self, *exc) -> None:
        if not self.disabled:
            self.p.stop()


def _prefect():
    from prefect import flow, task
    from prefect.cache_policies import NO_CACHE

    return flow, task, NO_CACHE


def _define():
    flow, task, NO_CACHE = _prefect()

    @task(name="fit_score_model", cache_policy=NO_CACHE, persist_result=False)
    def fit_score_model(data_spec: str, out: str, cfg: dict, sde: dict, overwrite: bool) -> dict:
        """Train on the data and write the checkpoint; returns its config document."""
        from pflatents.tasks.models.checkpoint import sde_from_dict
        from pflatents.tasks.data.sources import open_source
        from pflatents.tasks.training.train import TrainConfig, train_checkpoint

        def progress(step: int, total: int, loss: float) -> None:
            for h in list(hooks):
                h(step, total, loss)

        return train_checkpoint(open_source(data_spec), sde_from_dict(sde), TrainConfig(**cfg), out,
                                progress=progress, overwrite=overwrite)

    @flow(name="train", persist_result=False)
    def train(data_spec: str, out: str, cfg: dict, sde: dict, overwrite: bool = False) -> dict:
        """Fit a score network to a dataset and write a safetensors checkpoint."""
        return fit_score_model(data_spec, out, cfg, sde, overwrite)

    return train


_FLOW: list = []


def _flow():
    """The ``train`` flow, built on first use so that `pflatents --help` does not import Prefect."""
    if not _FLOW:
        _FLOW.append(_define())
    return _FLOW[0]


def __getattr__(name: str):
    if name == "train":
        return _flow()
    raise AttributeError(name)
