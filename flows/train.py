"""The ``train`` flow (what `pflatents train` runs): fit a score network to a dataset, write a safetensors checkpoint.

The checkpoint directory (``model.safetensors`` + ``config.json``) is a MODEL for ``extract`` and
``analyze``. ``run_train`` runs the flow with a progress bar (step, loss).
"""

from __future__ import annotations

from typing import Callable

__all__ = ["run_train", "hooks"]  # + the flow `train` (lazy)

# Process-local progress callbacks (step, total, loss), registered by the CLI around a flow run.
hooks: list[Callable[[int, int, float], None]] = []


def run_train(data_spec: str, out: str, cfg: dict, sde: dict, overwrite: bool = False, progress: bool = True,
              holdout: float = 0.0, device: str = "cpu", data_options: dict | None = None) -> dict:
    """Run the Prefect ``train`` flow (with a progress bar of steps and loss unless disabled); returns the checkpoint
    config. ``data_options``: the source's options (``Source.options``: resolution, channels, skip list, ...)."""
    from pflatents.flows.progress import bar
    from pflatents.flows.server import prefect_env, use_server

    prefect_env()
    api_url = use_server()
    with bar(cfg["steps"], "training", disabled=not progress, fields=("loss",)) as update:
        hook = lambda step, total, loss: update(completed=step, loss=f"{loss:.4f}")  # noqa: E731
        hooks.append(hook)
        try:
            from pathlib import Path

            from pflatents.flows import dashboard

            name = dashboard.run_name(f"train {Path(out).name}: {cfg['arch']}, {cfg['steps']} steps")
            kwargs = dict(data_spec=data_spec, out=out, cfg=cfg, sde=sde, overwrite=overwrite, holdout=holdout,
                          device=device, data_options=data_options or {})
            return dashboard.run_watched(_flow().with_options(flow_run_name=name), kwargs, out,
                                         ["pflatents", "train", f"model:{cfg['arch']}"], "training",
                                         "the same `pflatents train` again, with --overwrite", api_url)
        finally:
            hooks.remove(hook)


def _prefect():
    from prefect import flow, task
    from prefect.cache_policies import NO_CACHE

    return flow, task, NO_CACHE


def _define():
    flow, task, NO_CACHE = _prefect()

    @task(name="fit_score_model", cache_policy=NO_CACHE, persist_result=False)
    def fit_score_model(data_spec: str, out: str, cfg: dict, sde: dict, overwrite: bool, holdout: float = 0.0,
                        device: str = "cpu", data_options: dict | None = None) -> dict:
        """Train on the data (less a held-out fraction) and write the checkpoint; returns its config document."""
        from pflatents.tasks.models.checkpoint import sde_from_dict
        from pflatents.tasks.data.sources import open_source
        from pflatents.tasks.training.train import TrainConfig, train_checkpoint

        def progress(step: int, total: int, loss: float) -> None:
            for h in list(hooks):
                h(step, total, loss)

        return train_checkpoint(open_source(data_spec, **(data_options or {})), sde_from_dict(sde), TrainConfig(**cfg), out,
                                progress=progress, overwrite=overwrite, holdout=holdout, device=device)

    from pflatents.flows.dashboard import tasks_untagged

    @flow(name="train", persist_result=False)
    @tasks_untagged
    def train(data_spec: str, out: str, cfg: dict, sde: dict, overwrite: bool = False, holdout: float = 0.0,
              device: str = "cpu", data_options: dict | None = None) -> dict:
        """Fit a score network to a dataset and write a safetensors checkpoint (on ``device``)."""
        from pflatents.flows import dashboard

        doc = fit_score_model(data_spec, out, cfg, sde, overwrite, holdout, device, data_options)
        dashboard.hand_over(out, doc)
        return doc

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
