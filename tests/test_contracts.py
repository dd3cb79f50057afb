"""The shared contracts (pflatents.tasks.core) and the kind registries."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pflatents.tasks.core import Batch
from pflatents.tasks.data.registry import SOURCE_KINDS, absolute_spec, open_source, source_kind, stat_path
from pflatents.tasks.errors import DataError


def test_batch_rows_carry_ids_and_labels():
    b = Batch(np.arange(12.0).reshape(6, 2), np.array([f"s{i}" for i in range(6)]), np.arange(6, dtype=np.int64) * 10)
    part = b.rows(2, 5)
    assert part.x.tolist() == [[4.0, 5.0], [6.0, 7.0], [8.0, 9.0]]
    assert part.ids.tolist() == ["s2", "s3", "s4"]
    assert part.labels.tolist() == [20, 30, 40]
    assert len(part) == 3
    assert Batch(np.zeros((3, 2))).rows(0, 2).labels is None


@pytest.mark.parametrize("ids,labels,match", [
    (np.array(["a", "b"]), None, "needs 3 ids"),
    (None, np.arange(3, dtype=np.int32), "must be int64"),
    (None, np.arange(4, dtype=np.int64), "needs 3 labels"),
    (np.arange(3), None, "ids must be strings"),
])
def test_batch_refuses_misaligned_rows(ids, labels, match):
    with pytest.raises(DataError, match=match):
        Batch(np.zeros((3, 2)), ids, labels)


def test_every_source_kind_is_found_by_its_spec(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((4, 2), np.float32))
    (tmp_path / "d").mkdir()
    assert source_kind(str(tmp_path / "x.npy"))[0] is SOURCE_KINDS["npy"]
    assert source_kind(f"npydir:{tmp_path / 'd'}") == (SOURCE_KINDS["npydir"], str(tmp_path / "d"))
    assert source_kind("images:rel/dir") == (SOURCE_KINDS["images"], "rel/dir")
    assert source_kind("sklearn:digits")[0] is SOURCE_KINDS["sklearn"]
    assert source_kind("a/b.zarr/inner")[0] is SOURCE_KINDS["zarr"]
    assert SOURCE_KINDS["npydir"].growing and not SOURCE_KINDS["npy"].growing
    assert len(open_source(str(tmp_path / "x.npy"))) == 4
    with pytest.raises(DataError, match="unknown data source prefix 'hf:'"):
        source_kind("hf:mnist")


def test_specs_are_made_absolute_per_kind(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert absolute_spec("images:imgs") == f"images:{tmp_path / 'imgs'}"
    assert absolute_spec("npydir:d") == f"npydir:{tmp_path / 'd'}"
    assert absolute_spec("sklearn:digits") == "sklearn:digits"
    assert absolute_spec("s.zarr/inner/a") == f"{tmp_path / 's.zarr'}/inner/a"
    assert absolute_spec("x.npy") == str(tmp_path / "x.npy")
    assert absolute_spec("s3://bucket/x.zarr") == "s3://bucket/x.zarr"
    assert stat_path("s.zarr/inner/a") == "s.zarr" and stat_path("sklearn:digits") is None
    assert Path(stat_path(f"images:{tmp_path}")) == tmp_path


# ---- conditioning travels with its rows ---------------------------------------------------------------

import torch  # noqa: E402

from pflatents.tasks.core import Model, as_model  # noqa: E402
from pflatents.tasks.core import ModelBase  # noqa: E402
from pflatents.tasks.ode.batches import encode_block  # noqa: E402
from pflatents.tasks.ode.pfode import SOLVERS, SolverConfig, decode, encode  # noqa: E402
from pflatents.tasks.ode.sde import VPSDE  # noqa: E402

F64 = torch.float64
MEANS = torch.tensor([[0.0, 0.0], [3.0, -1.0], [-2.0, 4.0]], dtype=F64)


class ClassGaussian(ModelBase):
    """p(x0 | c) = N(mu_c, I) under a VP SDE: sigma^2 score = -sigma^2 (x - alpha mu_c) (alpha^2 + sigma^2 = 1).
    Checks on every call that it got one label per row."""

    conditional = True
    content_hash = "class-gaussian"
    dim = 2

    def __init__(self, sde):
        self.sde, self.rows = sde, []

    def sigma2_score(self, x, t, cond=None):
        assert cond is not None and cond.dtype == torch.int64 and cond.shape == (x.shape[0],)
        self.rows.append(x.shape[0])
        a, s2 = self.sde.alpha(t).to(x.dtype)[:, None], (self.sde.sigma(t) ** 2).to(x.dtype)[:, None]
        return -s2 * (x - a * MEANS.to(x.dtype)[cond])


def test_a_model_implements_the_contract():
    sde = VPSDE()
    assert isinstance(ClassGaussian(sde), Model)
    plain = as_model(lambda x, t: -x, sde)
    assert isinstance(plain, Model) and not plain.conditional
    assert as_model(ClassGaussian(sde), sde).conditional


@pytest.mark.parametrize("solver", sorted(SOLVERS))
def test_labels_follow_their_rows_through_every_solver(solver):
    """The PF-ODE of N(mu_c, I) under VP moves x by (alpha(T) - alpha(t_eps)) mu_c: each row must be
    integrated with its own label, also when dopri5 drops finished rows from the batch."""
    sde = VPSDE()
    model = ClassGaussian(sde)
    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([0, 1, 2, 2, 1, 0, 1], dtype=torch.int64)
    x0 = MEANS[labels] + torch.randn(7, 2, generator=g, dtype=F64)
    x0[3] *= 40.0  # a far-out row: dopri5 takes more steps for it than for the others
    cfg = SolverConfig(solver, rtol=1e-9, atol=1e-9, steps=64, t_eps=1e-3)
    res = encode(model, sde, x0, cfg, cond=labels)
    shift = (sde.alpha(torch.tensor(sde.T, dtype=F64)) - sde.alpha(torch.tensor(1e-3, dtype=F64))).item()
    tol = 1e-6 if solver in ("dopri5", "rk4") else 1e-2  # a wrong label is off by ~5
    torch.testing.assert_close(res.x, x0 + shift * MEANS[labels], rtol=tol, atol=tol)
    if SOLVERS[solver].adaptive:
        assert min(model.rows) < 7  # the solver handed the network fewer rows (and their labels) at the end
    back = decode(model, sde, res.x, cfg, cond=labels)
    torch.testing.assert_close(back.x, x0, rtol=tol, atol=tol)


def test_blocks_cut_labels_into_batches_with_their_rows():
    sde = VPSDE()
    model = ClassGaussian(sde)
    labels = np.array([2, 0, 1, 1, 2], dtype=np.int64)
    x = np.zeros((5, 2), dtype=np.float64)
    cfg = SolverConfig("dopri5", rtol=1e-8, atol=1e-8, t_eps=1e-3)
    whole = encode_block(model, sde, x, cfg, 5, torch.device("cpu"), "float64", labels=labels)[0]
    in_twos = encode_block(model, sde, x, cfg, 2, torch.device("cpu"), "float64", labels=labels)[0]
    assert np.array_equal(whole, in_twos)
    assert np.allclose(whole[1], 0) and not np.allclose(whole[0], whole[2])
    with pytest.raises(DataError, match="conditional"):
        encode_block(model, sde, x, cfg, 5, torch.device("cpu"), "float64")


# ---- a model family is one adapter and one registry line: a latent model end to end -------------------


class ToyLatent(ModelBase):
    """A latent model: data (4,) -> latent (2,) by summing pairs (decoder: half back to each); the latent
    prior is N(0, I): sigma^2 score = -sigma^2 x / (alpha^2 + sigma^2)."""

    content_hash = "toy-latent"
    dim = 2

    def __init__(self, sde):
        self.sde = sde

    @property
    def data_shape(self):
        return (4,)

    @property
    def latent_shape(self):
        return (2,)

    def encode_data(self, x):
        return x[:, :2] + x[:, 2:]

    def decode_data(self, z):
        return torch.cat([z / 2, z / 2], dim=1)

    def sigma2_score(self, x, t, cond=None):
        a, s2 = self.sde.alpha(t).to(x.dtype)[:, None], (self.sde.sigma(t) ** 2).to(x.dtype)[:, None]
        return -s2 * x / (a * a + s2)


def test_a_new_model_kind_is_one_registry_line_and_its_latent_shape_shapes_the_store(tmp_path, monkeypatch):
    from pflatents.flows.coordinator import Job, make_store, prepare
    from pflatents.storage import LatentStore
    from pflatents.tasks.models import registry
    from pflatents.tasks.wrappers.extract import run_shards

    monkeypatch.setitem(registry.MODEL_KINDS, "toylatent",
                        registry.ModelKind("toylatent", "toylatent:NAME", lambda rest, sde: ToyLatent(sde),
                                           resolve=lambda rest: rest, files=lambda rest: []))
    x = np.random.default_rng(0).normal(size=(12, 4)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    job = Job(data=str(tmp_path / "x.npy"), model="toylatent:demo", out=str(tmp_path / "out.zarr"),
              solver="rk4", steps=6, shard_size=12)
    p = prepare(job.resolved())
    assert p.cfg.model.kind == "toylatent" and p.cfg.model.latent_shape == [2] and p.cfg.latent_shape == (2,)
    store = make_store(p)
    assert store.sample_shape == (2,)
    run_shards(p.url, [0], device="cpu")
    z = LatentStore.open(p.url, mode="r").latents_array()[:]
    sde, cfg = p.cfg.make_sde(), p.cfg.make_solver()
    ref = encode(ToyLatent(sde), sde, torch.from_numpy(x), cfg).x.numpy()
    assert z.shape == (12, 2) and np.array_equal(z, ref)
    back = decode(ToyLatent(sde), sde, torch.from_numpy(z), cfg).x
    assert back.shape == (12, 4)
