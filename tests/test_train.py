"""Training: reproducible, learns, early stop, progress; `pflatents train` as a Prefect flow whose checkpoint
serves `extract` (the store pins its content hash) and whose replacement makes `resume` refuse."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pflatents.tasks.errors import InputError
from pflatents.tasks.models.networks import build_network
from pflatents.tasks.ode.sde import VPSDE
from pflatents.tasks.data.sources import open_source
from pflatents.tasks.training.train import TrainConfig, eval_loss, fit, train_checkpoint

TINY = {"hidden": 32, "depth": 2, "emb_dim": 16}


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: these nets are tiny, and on a shared 2-core box two threads spin-wait badly."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def correlated(n: int = 2000, seed: int = 0) -> np.ndarray:
    """2-D data on two bumps along a diagonal: per-dim Gaussian preconditioning cannot explain it."""
    rng = np.random.default_rng(seed)
    c = rng.choice([-1.0, 1.0], size=(n, 1))
    return (c * np.array([[0.7, 0.7]]) + 0.1 * rng.standard_normal((n, 2))).astype(np.float32)


def test_same_seed_same_weights_bit_for_bit(tmp_path):
    x = correlated(300)
    cfg = TrainConfig(arch_params=TINY, steps=40, batch_size=64, seed=7)
    a, b = fit(x, VPSDE(), cfg), fit(x, VPSDE(), cfg)
    sa, sb = a.net.state_dict(), b.net.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    c = fit(x, VPSDE(), TrainConfig(arch_params=TINY, steps=40, batch_size=64, seed=8))
    assert not torch.equal(sa["trunk.inp.weight"], c.net.state_dict()["trunk.inp.weight"])
    # and the written checkpoints are byte-identical, with the same content hash
    np.save(tmp_path / "x.npy", x)
    src = open_source(str(tmp_path / "x.npy"))
    d1 = train_checkpoint(src, VPSDE(), cfg, tmp_path / "m1")
    d2 = train_checkpoint(src, VPSDE(), cfg, tmp_path / "m2")
    assert d1["content_hash"] == d2["content_hash"]
    assert (tmp_path / "m1/model.safetensors").read_bytes() == (tmp_path / "m2/model.safetensors").read_bytes()


def test_training_beats_the_gaussian_start():
    """The untrained net is the exact per-dim Gaussian model; training must lower the held-out eps loss."""
    x, held = correlated(2000, 0), correlated(1000, 1)
    sde = VPSDE()
    init = build_network("mlp", (2,), "vp", **TINY)
    init.set_data_stats(torch.from_numpy(x).mean(0), torch.from_numpy(x).var(0, unbiased=False))
    res = fit(x, sde, TrainConfig(arch_params=TINY, steps=300, batch_size=256, lr=3e-3, seed=0))
    before, after = eval_loss(init.eval(), held, sde, n_s=16), eval_loss(res.net, held, sde, n_s=16)
    assert after < 0.9 * before, (before, after)
    assert res.summary["loss_last_100"] < res.summary["loss_first_100"]


def test_progress_callback_and_early_stop():
    seen = []
    res = fit(correlated(200), VPSDE(), TrainConfig(arch_params=TINY, steps=5000, batch_size=32, lr=1e-9, seed=0,
                                                    patience=20, warmup=0),
              progress=lambda step, total, loss: seen.append((step, total, loss)))
    assert res.summary["stopped"] == "early_stop" and res.summary["steps_done"] < 5000
    assert [s for s, _, _ in seen] == list(range(1, res.summary["steps_done"] + 1))
    assert all(total == 5000 and np.isfinite(loss) for _, total, loss in seen)


def test_unet_on_images_and_bad_settings(tmp_path):
    imgs = np.random.default_rng(0).uniform(-1, 1, (64, 1, 8, 8)).astype(np.float32)
    res = fit(imgs, VPSDE(), TrainConfig(arch="unet", arch_params={"base": 8, "groups": 4}, steps=3,
                                         batch_size=8, seed=0))
    out = res.net(torch.from_numpy(imgs[:3]), torch.zeros(3))
    assert out.shape == (3, 1, 8, 8) and torch.isfinite(out).all()
    np.save(tmp_path / "flat.npy", np.zeros((10, 4), np.float32))
    with pytest.raises(InputError, match="unet needs image samples"):
        train_checkpoint(open_source(str(tmp_path / "flat.npy")), VPSDE(), TrainConfig(arch="unet"), tmp_path / "m")
    for bad in ({"steps": 0}, {"lr": -1.0}, {"ema_decay": 1.0}, {"time_sampling": "edm"}, {"arch": "resnet"}):
        with pytest.raises(InputError):
            TrainConfig(**bad)
    with pytest.raises(InputError, match="unknown mlp parameter"):
        train_checkpoint(open_source(str(tmp_path / "flat.npy")), VPSDE(),
                         TrainConfig(arch_params={"width": 3}), tmp_path / "m")


def test_train_flow_checkpoint_extract_and_resume_refusal(tmp_path, prefect_api, capsys):
    """`pflatents train` runs as a Prefect flow; its checkpoint is an extract MODEL pinned by content hash;
    replacing the checkpoint makes `resume` refuse."""
    import asyncio

    from pflatents.flows.cli import main
    from pflatents.storage import LatentStore

    x = correlated(120)
    np.save(tmp_path / "x.npy", x)
    ck = tmp_path / "model"
    train = ["train", "--data", str(tmp_path / "x.npy"), "--out", str(ck), "--steps", "30", "--batch-size", "32",
             "--hidden", "32", "--depth", "1", "--no-progress"]
    assert main(train) == 0
    doc = json.loads((ck / "config.json").read_text())
    assert doc["summary"]["steps_done"] == 30 and doc["sde"] == VPSDE().to_dict()
    assert main(train) == 2 and "--overwrite" in capsys.readouterr().err  # never clobbered silently

    async def train_runs():
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import FlowFilter, FlowFilterName

        async with get_client() as client:
            return await client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["train"])))
    runs = asyncio.run(train_runs())
    assert any(r.state is not None and r.state.is_completed() and r.parameters.get("out") == str(ck.resolve())
               for r in runs)

    store = tmp_path / "o.zarr"
    assert main(["extract", "--data", str(tmp_path / "x.npy"), "--model", str(ck), "--out", str(store),
                 "--no-progress", "--solver", "heun", "--steps", "8", "--shard-size", "60"]) == 0
    cfg = LatentStore.open(str(store), mode="r").config
    assert cfg["model"]["content_hash"] == doc["content_hash"] and cfg["model"]["kind"] == "ckpt"
    z = np.asarray(LatentStore.open(str(store), mode="r").latents_array()[:])
    assert z.shape == x.shape and np.isfinite(z).all()

    assert main(train[:-1] + ["--seed", "1", "--overwrite", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["resume", str(store), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "changed since the store was created" in err and "content hash" in err
