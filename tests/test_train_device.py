"""Training on a device: the seeded CPU result is bitwise what it was before the device option existed;
the bf16 autocast path trains; a GPU run (where there is one) returns CPU weights and records its device."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from pflatents.tasks.data.sources import open_source
from pflatents.tasks.errors import InputError
from pflatents.tasks.ode.sde import VPSDE
from pflatents.tasks.training.train import TrainConfig, fit, train_checkpoint

# sha256 of the trained state_dicts below, recorded with the training code as it was before `device`
# existed (commit 7bdd47f) and again after D's float64-label change, torch 2.13.0+cpu. The float sums
# of CPU kernels depend on the instruction set torch picks, so each digest set belongs to one kind of
# CPU (``_cpu_kind``): the 2026-11-30 VM's (its kind not recorded) and the 2026-12-04 VM's
# (Sapphire Rapids: AVX-512 with FP16 and AMX), where the 2026-11-30 digests did not hold.
REF_TORCH = "2.13.0+cpu"
REF = {"mlp": "d032a137d667a83b092a90265be23be3c5c58215ac742fbae027b3bd61b50ff9",
       "unet": "0e2aefd6749b8de326a87d57ecc109af5b67a6161807ff4f9678aaa17e815342"}
REF_BY_CPU = {
    "AVX512+amx_tile+avx512_bf16+avx512_fp16+avx_vnni": {
        "mlp": "a6ea68e8bed6e35f37f170d03c47ea3fea4b525d122c3e7f5b752515125d8757",
        "unet": "a2dcf46a47e02e68b9cfff168b0fc8fbff31ff2fef344c17b22d4ac236cc1750"},
}


def _cpu_kind() -> str:
    """torch's CPU capability and the instruction-set extensions that change its kernels' sums."""
    try:
        flags = set(next(ln for ln in open("/proc/cpuinfo") if ln.startswith("flags")).split(":")[1].split())
    except (OSError, StopIteration):
        flags = set()
    extra = sorted(flags & {"amx_tile", "avx512_bf16", "avx512_fp16", "avx_vnni"})
    return "+".join([torch.backends.cpu.get_cpu_capability(), *extra])


def _digest(net: torch.nn.Module) -> str:
    m = hashlib.sha256()
    for k, v in sorted(net.state_dict().items()):
        m.update(k.encode())
        m.update(v.detach().cpu().contiguous().numpy().tobytes())
    return m.hexdigest()


def _runs(**kw):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((200, 8)) * np.linspace(0.5, 2, 8)).astype(np.float32)
    mlp = fit(x, VPSDE(), TrainConfig(arch="mlp", arch_params={"hidden": 32, "depth": 2, "emb_dim": 16},
                                      steps=40, batch_size=32, seed=3), **kw)
    xi = rng.standard_normal((64, 3, 8, 8)).astype(np.float32)
    unet = fit(xi, VPSDE(), TrainConfig(arch="unet", arch_params={"base": 8, "mults": [1, 2], "emb_dim": 16,
                                                                  "groups": 4}, steps=8, batch_size=16, seed=1), **kw)
    return {"mlp": mlp, "unet": unet}


def test_seeded_cpu_training_is_bitwise_unchanged():
    if torch.__version__ != REF_TORCH:
        pytest.skip(f"reference digests were recorded with torch {REF_TORCH}")
    # recorded with this CPU's 2 torch threads (one thread orders some float sums differently and gives
    # other digests); tests/conftest.py restores the count after the test
    torch.set_num_threads(2)
    # a CPU kind with digests recorded: exactly those; any other: the earlier VM's
    ref = REF_BY_CPU.get(_cpu_kind(), REF)
    for kw in ({}, {"device": "cpu"}, {"device": "cpu", "amp": "auto"}):
        got = {k: _digest(r.net) for k, r in _runs(**kw).items()}
        assert got == ref, (kw, _cpu_kind())


def test_bf16_autocast_trains_and_differs_only_by_rounding():
    ref, bf = _runs(), _runs(amp="bf16")
    for k in ref:
        assert np.isfinite(bf[k].summary["final_loss_smoothed"])
        assert _digest(bf[k].net) != _digest(ref[k].net)
        assert abs(bf[k].summary["loss_last_100"] - ref[k].summary["loss_last_100"]) < 0.05
    with pytest.raises(InputError, match="training autocast must be bf16 or none; got 'fp16'"):
        fit(np.zeros((4, 2), np.float32), VPSDE(), TrainConfig(steps=1), amp="fp16")


def test_checkpoint_records_the_device_outside_the_content_hash(tmp_path):
    x = np.random.default_rng(1).standard_normal((64, 3)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    cfg = TrainConfig(arch_params={"hidden": 8, "depth": 1, "emb_dim": 8}, steps=5, batch_size=16)
    a = train_checkpoint(open_source(str(tmp_path / "x.npy")), VPSDE(), cfg, tmp_path / "a")
    b = train_checkpoint(open_source(str(tmp_path / "x.npy")), VPSDE(), cfg, tmp_path / "b", device="cpu")
    assert a["provenance"]["device"] == "cpu" and a["provenance"]["autocast"] == "none"
    assert a["content_hash"] == b["content_hash"]
    assert "device" not in json.dumps(a["train"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_training_returns_cpu_weights_with_a_finite_loss():
    runs = _runs(device="cuda")
    for r in runs.values():
        assert np.isfinite(r.summary["final_loss_smoothed"])
        assert all(p.device.type == "cpu" for p in r.net.parameters())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_train_cli_refuses_cuda_without_a_gpu_before_prefect_starts(tmp_path, capsys):
    from pflatents.flows.cli import main

    np.save(tmp_path / "x.npy", np.zeros((8, 2), np.float32))
    code = main(["train", "--data", str(tmp_path / "x.npy"), "--out", str(tmp_path / "m"), "--device", "cuda",
                 "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "device 'cuda' asked for, but torch sees no CUDA GPU here" in err
    assert not (tmp_path / "m").exists()
