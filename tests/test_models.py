"""Checkpoints as MODELs: safetensors loading, content hash, cache, SDE pinning, and pickles refused unexecuted."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from pflatents.tasks.models.checkpoint import WEIGHTS, load_checkpoint
from pflatents.tasks.errors import ModelError
from pflatents.tasks.models.registry import is_pickle_file, load_model, model_info, native_sde, resolve_model_spec
from pflatents.tasks.ode.sde import VPSDE, VESDE
from pflatents.tasks.data.sources import open_source
from pflatents.tasks.training.train import TrainConfig, train_checkpoint

F64 = torch.float64
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("ckpt")
    x = np.random.default_rng(0).standard_normal((300, 4)).astype(np.float32) * [1, 2, 0.5, 1]
    np.save(d / "x.npy", x.astype(np.float32))
    cfg = TrainConfig(arch_params={"hidden": 16, "depth": 1, "emb_dim": 8}, steps=20, batch_size=32, seed=0)
    train_checkpoint(open_source(str(d / "x.npy")), VPSDE(), cfg, d / "m")
    return d / "m"


def test_checkpoint_is_a_model_by_path_and_by_ckpt_prefix(ckpt):
    spec = resolve_model_spec(str(ckpt))
    assert spec == f"ckpt:{ckpt.resolve()}" == resolve_model_spec(f"ckpt:{ckpt}")
    info = model_info(str(ckpt), VPSDE())
    doc = json.loads((ckpt / "config.json").read_text())
    assert info.kind == "ckpt" and info.dim == 4 and info.content_hash == doc["content_hash"]
    assert native_sde(str(ckpt)) == VPSDE()


def test_score_is_eps_adapter_of_the_net(ckpt):
    """score(x, t) = -eps_net(x, s(t)) / sigma(t), the net in eval mode; float64 in -> float64 out."""
    sde = VPSDE()
    model = load_model(str(ckpt), sde)
    net = model.module
    assert not net.training
    x = torch.randn(5, 4, dtype=F64)
    t = torch.tensor([1e-5, 0.01, 0.3, 0.7, 1.0], dtype=F64)
    with torch.no_grad():
        eps = net(x.float(), sde.s_of_t(t).float()).double()
        got = model(x, t)
    assert got.dtype == F64
    torch.testing.assert_close(got, -eps / sde.sigma(t)[:, None], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(model.sigma2_score(x, t), -eps * sde.sigma(t)[:, None], rtol=1e-6, atol=1e-9)


def test_loaded_once_and_reloaded_when_files_change(ckpt, tmp_path):
    import shutil

    a = load_model(str(ckpt), VPSDE())
    assert load_model(f"ckpt:{ckpt}", VPSDE()) is a
    copy = tmp_path / "m"
    shutil.copytree(ckpt, copy)
    b = load_model(str(copy), VPSDE())
    os.utime(copy / WEIGHTS, ns=(1, 1))  # same bytes, new stamp: reloaded (and still valid)
    assert load_model(str(copy), VPSDE()) is not b


def test_edited_checkpoint_fails_its_content_hash(ckpt, tmp_path):
    import shutil

    copy = tmp_path / "m"
    shutil.copytree(ckpt, copy)
    doc = json.loads((copy / "config.json").read_text())
    doc["train"]["lr"] = 1.0
    (copy / "config.json").write_text(json.dumps(doc))
    with pytest.raises(ModelError, match="content hash"):
        load_checkpoint(copy)
    shutil.copytree(ckpt, tmp_path / "m2")
    raw = bytearray((tmp_path / "m2" / WEIGHTS).read_bytes())
    raw[-1] ^= 1
    (tmp_path / "m2" / WEIGHTS).write_bytes(bytes(raw))
    with pytest.raises(ModelError, match="content hash"):
        load_checkpoint(tmp_path / "m2")
    (tmp_path / "m2" / WEIGHTS).unlink()
    with pytest.raises(ModelError, match="no model.safetensors"):
        load_checkpoint(tmp_path / "m2")


def test_checkpoint_refuses_another_sde(ckpt):
    with pytest.raises(ModelError, match="trained under the SDE"):
        load_model(str(ckpt), VPSDE(beta_max=10.0))
    with pytest.raises(ModelError, match="use --sde vp"):
        load_model(str(ckpt), VESDE())


def test_not_a_model(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="not a pflatents checkpoint"):
        resolve_model_spec(str(tmp_path / "empty"))
    with pytest.raises(ModelError, match="not found"):
        resolve_model_spec(str(tmp_path / "nope"))
    with pytest.raises(ModelError, match="unknown model kind"):
        resolve_model_spec("onnx:/x.onnx")


# ---- pickles ------------------------------------------------------------------------------------

class Evil:
    """Unpickling this creates the marker file: the payload a malicious checkpoint would run."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _evil_files(tmp_path: Path, marker: Path) -> dict[str, Path]:
    payload = pickle.dumps(Evil(str(marker)))
    files = {}
    for name in ("model.pt", "model.pth", "model.pkl", "model.ckpt", "model.bin", "no_suffix", "weights.json"):
        files[name] = tmp_path / name
        files[name].write_bytes(payload)
    zp = tmp_path / "zip_checkpoint"  # torch.save's zip format, no telling suffix
    torch.save({"state": Evil(str(marker))}, zp)
    files["zip"] = zp
    ck = tmp_path / "ckdir"  # a checkpoint dir whose "safetensors" is a pickle
    ck.mkdir()
    (ck / WEIGHTS).write_bytes(payload)
    (ck / "config.json").write_text(json.dumps({"format": "pflatents.checkpoint", "version": 1,
                                                "network": {}, "sde": {"name": "vp"}, "content_hash": "0"}))
    files["ckdir"] = ck
    return files


def test_the_evil_pickle_is_live(tmp_path):
    """Sanity check of the test payload: unpickling it does create the marker (in this test only)."""
    marker = tmp_path / "live"
    pickle.loads(pickle.dumps(Evil(str(marker))))
    assert marker.exists()
    with zipfile.ZipFile(_evil_files(tmp_path, tmp_path / "other")["zip"]) as z:
        assert any(n.endswith(".pkl") for n in z.namelist())


def test_pickles_refused_and_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    files = _evil_files(tmp_path, marker)
    assert is_pickle_file(files["no_suffix"]) and is_pickle_file(files["zip"])
    for name, path in files.items():
        for spec in (str(path), f"ckpt:{path}", f"gmm:{path}", f"diffusers:{path}"):
            with pytest.raises(ModelError):
                load_model(spec, VPSDE())
            assert not marker.exists(), f"payload executed for {spec}"
    for name in ("model.pt", "no_suffix", "zip"):
        with pytest.raises(ModelError, match="pickled checkpoints"):
            load_model(str(files[name]), VPSDE())
    assert not marker.exists()


def test_cli_refuses_pickle_without_running_it(tmp_path):
    """Through the real command line, in a fresh process (nothing cached): exit 2, payload not run."""
    marker = tmp_path / "pwned"
    files = _evil_files(tmp_path, marker)
    np.save(tmp_path / "x.npy", np.zeros((10, 4), np.float32))
    for key in ("zip",):
        out = subprocess.run([str(Path(sys.executable).parent / "pflatents"), "extract", "--data",
                              str(tmp_path / "x.npy"), "--model", str(files[key]), "--out", str(tmp_path / "o.zarr")],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 2, out.stderr
        assert out.stderr.startswith("pflatents: error:") and "Traceback" not in out.stderr
        assert not marker.exists()
        assert not (tmp_path / "o.zarr").exists()
