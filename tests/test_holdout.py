"""A seeded train / held-out split: rebuilt exactly from its record, and a checkpoint that records it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pflatents.tasks.data.sources import open_source
from pflatents.tasks.data.split import holdout_split, split_from_record, split_record
from pflatents.tasks.errors import InputError
from pflatents.tasks.ode.sde import VPSDE
from pflatents.tasks.training.train import TrainConfig, fit, train_checkpoint


def test_split_is_seeded_disjoint_and_rebuilt_from_its_record():
    train, held = holdout_split(1000, 0.2, seed=3)
    assert len(held) == 200 and len(train) == 800
    assert np.array_equal(np.sort(np.r_[train, held]), np.arange(1000))
    assert np.array_equal(holdout_split(1000, 0.2, seed=3)[1], held)
    assert not np.array_equal(holdout_split(1000, 0.2, seed=4)[1], held)
    rec = split_record(1000, 0.2, 3, "blake2b:x")
    t2, h2 = split_from_record(rec)
    assert np.array_equal(t2, train) and np.array_equal(h2, held)
    with pytest.raises(InputError, match="digest"):
        split_from_record({**rec, "seed": 4})
    for bad in (1.0, -0.1, float("nan")):
        with pytest.raises(InputError, match="--holdout"):
            holdout_split(10, bad)
    with pytest.raises(InputError, match="at least one"):
        holdout_split(10, 0.01)
    assert len(holdout_split(10, 0.0)[1]) == 0


def test_checkpoint_records_the_split_and_trains_on_the_training_rows_only(tmp_path):
    torch.set_num_threads(1)
    x = np.random.default_rng(0).normal(size=(400, 3)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    src = open_source(str(tmp_path / "x.npy"))
    cfg = TrainConfig(arch_params={"hidden": 16, "depth": 1, "emb_dim": 8}, steps=20, batch_size=64, seed=5)
    doc = train_checkpoint(src, VPSDE(), cfg, tmp_path / "m", holdout=0.25)
    rec = doc["data"]["holdout"]
    assert (rec["n_train"], rec["n_heldout"], rec["seed"], rec["fingerprint"]) == (300, 100, 5, src.fingerprint())
    assert rec["eval_loss_heldout"] > 0 and rec["eval_loss_train"] > 0
    train, _ = split_from_record(rec)
    ref = fit(x[train], VPSDE(), TrainConfig(**{**cfg.__dict__, "arch_params": doc["train"]["arch_params"]}))
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "m" / "model.safetensors"))
    ref_sd = ref.net.state_dict()
    assert any(k in saved for k in ref_sd)
    assert all(torch.equal(saved[k], ref_sd[k]) for k in ref_sd if k in saved)
    assert "holdout" not in train_checkpoint(src, VPSDE(), cfg, tmp_path / "m2")["data"]


def test_train_cli_holdout(tmp_path, prefect_api, capsys):
    import json

    from pflatents.flows.cli import main

    np.save(tmp_path / "x.npy", np.random.default_rng(1).normal(size=(200, 2)).astype(np.float32))
    args = ["train", "--data", str(tmp_path / "x.npy"), "--out", str(tmp_path / "m"), "--steps", "5",
            "--hidden", "8", "--depth", "1", "--no-progress", "--seed", "2"]
    assert main([*args, "--holdout", "1.5"]) == 2
    assert "--holdout" in capsys.readouterr().err and not (tmp_path / "m").exists()
    assert main([*args, "--holdout", "0.1"]) == 0
    rec = json.loads((tmp_path / "m" / "config.json").read_text())["data"]["holdout"]
    assert (rec["n_heldout"], rec["seed"]) == (20, 2)
