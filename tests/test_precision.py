"""Network precision and compilation of the network adapter (DeviceNet) and the model registry."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from pflatents.tasks.data.sources import open_source
from pflatents.tasks.errors import InputError, ModelError
from pflatents.tasks.models import precision as P
from pflatents.tasks.models.adapters import DeviceNet
from pflatents.tasks.models.registry import load_model
from pflatents.tasks.ode.pfode import SolverConfig
from pflatents.tasks.ode.sde import VPSDE
from pflatents.tasks.training.train import TrainConfig, train_checkpoint

F64 = torch.float64


class Net(nn.Module):
    """x, label -> W2 silu(W1 x + label): every operation follows the weights' dtype."""

    def __init__(self, d: int = 6) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.l1, self.l2 = nn.Linear(d, 32), nn.Linear(32, d)
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=g) * 0.5

    def forward(self, x, lab):
        return self.l2(nn.functional.silu(self.l1(x) + lab[:, None]))


def _inputs(dtype=F64, n: int = 64, d: int = 6):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, d, generator=g, dtype=dtype), torch.rand(n, generator=g, dtype=dtype)


def test_fp64_evaluates_the_network_in_float64_end_to_end():
    net = Net()
    x, lab = _inputs()
    with torch.no_grad():
        ref = Net().double()(x, lab)  # same seeded weights, built in float64 by hand
        fp64 = DeviceNet(net, precision="fp64")(x, lab)
        fp32 = DeviceNet(net, precision="fp32")(x, lab)
    assert fp64.dtype == F64 and fp32.dtype == F64
    assert (fp64 - ref).abs().max() < 1e-12
    err32 = (fp32 - ref).abs().max()
    assert 1e-9 < err32 < 1e-4  # float32 rounding, which fp64 removes
    assert net.l1.weight.dtype == torch.float32  # the given module is not cast in place


def test_default_and_fp32_match_the_plain_float32_call_bitwise_and_tf32_is_fp32_on_cpu():
    net = Net()
    x, lab = _inputs()
    with torch.no_grad():
        plain = net(x.float(), lab.float()).double()
        for prec in (None, "fp32", "tf32"):
            assert torch.equal(DeviceNet(net, precision=prec)(x, lab), plain), prec


def test_bf16_runs_under_autocast_with_bf16_sized_error():
    net = Net()
    x, lab = _inputs(torch.float32)
    with torch.no_grad():
        ref = Net().double()(x.double(), lab.double())
        out = DeviceNet(net, precision="bf16")(x, lab)
    assert out.dtype == torch.float32
    rel = ((out.double() - ref).abs().max() / ref.abs().max()).item()
    assert 1e-4 < rel < 5e-2  # bfloat16 has 8 mantissa bits: ~4e-3 relative per rounding


def test_a_failing_compile_falls_back_to_eager_with_a_clear_warning(monkeypatch):
    def broken(module, *a, **k):
        def call(*args, **kw):
            raise RuntimeError("inductor backend unavailable")
        return call

    monkeypatch.setattr(torch, "compile", broken)
    net = Net()
    x, lab = _inputs()
    dn = DeviceNet(net, precision="fp32", compile="on")
    with pytest.warns(RuntimeWarning, match="torch.compile of the network failed on cpu.*inductor backend"):
        out = dn(x, lab)
    with torch.no_grad():
        assert torch.equal(out, net(x.float(), lab.float()).double())
    assert dn.compile_status["cpu"].startswith("failed: RuntimeError")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(dn(x, lab), out)  # no second attempt, no second warning


def test_compile_auto_is_off_on_cpu():
    assert not P.use_compile("auto", torch.device("cpu"))
    assert P.use_compile("auto", torch.device("cuda", 0)) and P.use_compile("on", torch.device("cpu"))
    dn = DeviceNet(Net(), compile="auto")
    dn(*_inputs())
    assert dn.compile_status == {"cpu": "eager"}


def test_precision_resolution_and_refusals():
    assert P.resolve_precision(None, "float32") == "fp32"
    assert P.resolve_precision(None, "float64") == "fp64"
    assert P.resolve_precision("bf16", "float32") == "bf16"
    assert P.resolve_precision("fp64", "float32") == "fp64"  # a network may run above the state's dtype
    with pytest.raises(InputError, match="unknown network precision 'fp16'.*fp32, tf32, bf16, fp64"):
        P.resolve_precision("fp16", "float32")
    with pytest.raises(InputError, match="--precision bf16 applies to networks; a gmm model"):
        P.resolve_precision("bf16", "float32", kind="gmm")
    with pytest.raises(InputError, match="unknown compile mode 'yes'"):
        P.check_compile("yes")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("prec")
    x = np.random.default_rng(0).standard_normal((200, 5)).astype(np.float32) * [1, 2, 0.5, 1, 3]
    np.save(d / "x.npy", x)
    cfg = TrainConfig(arch_params={"hidden": 16, "depth": 1, "emb_dim": 8}, steps=30, batch_size=32, seed=0)
    train_checkpoint(open_source(str(d / "x.npy")), VPSDE(), cfg, d / "m")
    return d / "m"


def test_registry_gives_a_configured_model_and_caches_it(ckpt):
    sde = VPSDE()
    base = load_model(str(ckpt), sde)
    m64 = load_model(str(ckpt), sde, precision="fp64")
    assert load_model(str(ckpt), sde, precision="fp64") is m64 and m64 is not base
    assert base.net.precision is None and m64.net.precision == "fp64"
    assert m64.content_hash == base.content_hash
    x = torch.randn(8, 5, dtype=F64)
    t = torch.linspace(0.01, 1.0, 8, dtype=F64)
    with torch.no_grad():
        out = m64(x, t)
    assert out.dtype == F64
    assert next(m64.net.on(torch.device("cpu")).parameters()).dtype == F64
    assert next(base.module.parameters()).dtype == torch.float32
    torch.testing.assert_close(out, base(x, t), rtol=1e-4, atol=1e-5)


def test_exact_scores_refuse_network_precisions(tmp_path):
    import json

    p = tmp_path / "g.json"
    p.write_text(json.dumps({"weights": [1.0], "means": [[0.0, 0.0]], "covariances": [[[1.0, 0.0], [0.0, 1.0]]]}))
    sde = VPSDE()
    assert load_model(f"gmm:{p}", sde, precision="fp64") is load_model(f"gmm:{p}", sde)
    with pytest.raises(ModelError, match="--precision bf16 applies to networks"):
        load_model(f"gmm:{p}", sde, precision="bf16")


def _job(tmp_path, ckpt, **kw):
    from pflatents.flows.coordinator import Job

    x = np.random.default_rng(2).standard_normal((24, 5)).astype(np.float32)
    if not (tmp_path / "x.npy").exists():
        np.save(tmp_path / "x.npy", x)
    return Job(data=str(tmp_path / "x.npy"), model=str(ckpt), out=str(tmp_path / "s.zarr"), solver="rk4", steps=4,
               shard_size=12, **kw)


def _open(job):
    from pflatents.flows.coordinator import locked, make_store, prepare

    p = prepare(job)
    with locked(lambda: make_store(p), p.url, {"command": "test"}) as store:
        return store.config


def test_precision_and_compile_are_pinned_and_a_different_precision_is_refused(tmp_path, ckpt):
    from pflatents.storage.errors import StoreError

    cfg = _open(_job(tmp_path, ckpt, precision="bf16", compile="off"))
    assert cfg["precision"] == "bf16" and cfg["compile"] == "off"
    assert _open(_job(tmp_path, ckpt, precision="bf16", compile="off")) == cfg  # the same job continues
    for other in ({"compile": "off"}, {"precision": "fp64", "compile": "off"}, {"precision": "bf16", "compile": "on"}):
        with pytest.raises((InputError, StoreError), match="precision|compile"):
            _open(_job(tmp_path, ckpt, **other))
    assert _open(_job(tmp_path, ckpt, precision="bf16")) == cfg  # --compile auto: the store's mode


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_a_network_store_pinned_before_precision_and_compile_continues_with_the_default_flags(tmp_path, ckpt, dtype):
    """A store pinned by the code before precision and compile existed (no such fields: float32 weights,
    eager) continues with the default flags (--compile auto takes the store's mode; the default precision
    is what it ran); explicit conflicting flags are refused; the stored JSON is left as it was."""
    from pflatents.flows.coordinator import locked, make_store, prepare
    from pflatents.storage import LatentStore, open_or_create
    from pflatents.storage.errors import StoreError

    job = _job(tmp_path, ckpt, dtype=dtype)
    old = prepare(job).cfg.to_dict()
    del old["precision"], old["compile"]  # the fields the code before commit 017892d did not pin
    assert set(old) == {"data", "model", "sde", "solver", "shard_size", "batch_size", "dtype"}
    open_or_create(job.out, config=old, n_samples=24, sample_shape=(5,), shard_size=12)
    p = prepare(job)
    assert (p.cfg.precision, p.cfg.compile) == ("fp32", "off")
    with locked(lambda: make_store(p), p.url, {"command": "test"}) as store:
        assert store.pending_shards() == [0, 1]
    assert LatentStore.open(job.out, mode="r").config == old
    for other in ({"compile": "on"}, {"precision": "bf16"}, {"precision": "fp64" if dtype == "float32" else "tf32"}):
        with pytest.raises((InputError, StoreError), match="precision|compile") as e:
            _open(_job(tmp_path, ckpt, dtype=dtype, **other))
        assert ("compile" in str(e.value)) == ("compile" in other), e.value  # only real differences named
        assert ("precision" in str(e.value)) == ("precision" in other), e.value


def test_default_precision_follows_the_state_dtype_and_old_stores_read_as_float32_eager(tmp_path, ckpt):
    from pflatents.flows.coordinator import prepare
    from pflatents.tasks.config import ExtractConfig

    assert prepare(_job(tmp_path, ckpt)).cfg.precision == "fp32"
    assert prepare(_job(tmp_path, ckpt, dtype="float64")).cfg.precision == "fp64"
    assert prepare(_job(tmp_path, ckpt)).cfg.compile == "auto"
    old = prepare(_job(tmp_path, ckpt)).cfg.to_dict()
    del old["precision"], old["compile"]
    back = ExtractConfig.from_dict(old)
    assert back.precision == "fp32" and back.compile == "off"


def test_a_network_precision_for_an_exact_score_is_refused_before_anything_is_written(tmp_path):
    import json

    from pflatents.flows.coordinator import Job, prepare

    p = tmp_path / "g.json"
    p.write_text(json.dumps({"weights": [1.0], "means": [[0.0, 0.0]], "covariances": [[[1.0, 0.0], [0.0, 1.0]]]}))
    np.save(tmp_path / "x.npy", np.zeros((4, 2), np.float32))
    with pytest.raises(InputError, match="--precision bf16 applies to networks"):
        prepare(Job(data=str(tmp_path / "x.npy"), model=f"gmm:{p}", out=str(tmp_path / "s.zarr"), precision="bf16"))
    assert not (tmp_path / "s.zarr").exists()


def test_a_shard_runs_at_the_pinned_precision_and_records_how_the_network_ran(tmp_path, ckpt):
    from pflatents.storage import LatentStore
    from pflatents.tasks.ode.batches import encode_block
    from pflatents.tasks.wrappers.extract import run_shard

    job = _job(tmp_path, ckpt, precision="bf16", compile="off")
    cfg = _open(job)
    run_shard(job.out, 0, device="cpu")
    store = LatentStore.open(job.out, mode="r")
    z = np.asarray(store.latents_array()[:12])
    x = np.load(tmp_path / "x.npy")[:12]
    sde = VPSDE()
    solver = SolverConfig(**{k: v for k, v in cfg["solver"].items()})
    enc = {p: encode_block(load_model(str(ckpt), sde, precision=p), sde, x, solver, 1024, torch.device("cpu"))[0]
           for p in ("bf16", "fp32")}
    assert np.array_equal(z, enc["bf16"]) and np.abs(z - enc["fp32"]).max() > 1e-5  # bf16 rounding, not float32
    rec = json.dumps(store.shard_record(0), default=str)
    assert '"network": {"precision": "bf16", "compile": "eager"}' in rec, rec


def test_a_compiled_network_runs_through_dynamo_and_matches_eager(monkeypatch):
    """The real torch.compile path (dynamo tracing; the 'eager' backend keeps the test fast)."""
    import functools

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    net = Net()
    x, lab = _inputs()
    dn = DeviceNet(net, precision="fp32", compile="on")
    with torch.no_grad():
        out = dn(x, lab)
        assert torch.equal(out, net(x.float(), lab.float()).double())
        dn(x[:7], lab[:7])  # another batch size (adaptive solvers shrink batches)
    assert dn.compile_state("cpu") == "compiled"


def test_tf32_is_switched_off_on_a_gpu_unless_asked_for():
    """The flags DeviceNet sets before each GPU call (set here without a GPU: they are plain torch settings)."""
    flags = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32,
             torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction)
    try:
        torch.backends.cudnn.allow_tf32 = True  # torch's own default for convolutions
        for prec in (None, "fp32", "bf16", "fp64"):
            P.set_matmul_flags(prec, torch.device("cuda", 0))
            assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32, prec
            assert not torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction
        P.set_matmul_flags("tf32", torch.device("cuda", 0))
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
        torch.backends.cudnn.allow_tf32 = True
        P.set_matmul_flags("fp32", torch.device("cpu"))  # a CPU call leaves them alone
        assert torch.backends.cudnn.allow_tf32
    finally:
        (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32,
         torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction) = flags


def test_gpu_matmul_flags_hold_for_the_call_only(monkeypatch):
    """The flags a GPU network call needs are set for that call and the process's own are put back
    (set here without a GPU: they are plain torch settings); a DeviceNet call goes through them."""
    flags = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32,
             torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction)
    try:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = True
        with P.matmul_flags("fp32", torch.device("cuda", 0)):
            assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
            assert not torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
        assert torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction
        seen = []
        monkeypatch.setattr(P, "set_matmul_flags", lambda prec, dev: seen.append((prec, dev.type)))
        monkeypatch.setattr("pflatents.tasks.models.adapters._full", lambda d: torch.device("cuda", 0))
        dn = DeviceNet(Net(), precision="fp32")
        monkeypatch.setattr(dn, "_runner", lambda dev: dn.module)
        x, lab = _inputs()
        dn(x, lab)
        assert seen == [("fp32", "cuda")]
    finally:
        (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32,
         torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction) = flags
