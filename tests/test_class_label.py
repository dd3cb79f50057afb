"""``--class-label K``: every row of a class-conditional model conditioned on class K.

The model is a ``py:`` flow network holding the exact velocity of class-conditional Gaussians
N(mu_k, s^2 I), mu_k = (k + 1) MU, so the latent of any x under class k is known in closed form:
z = (x - (1 - t_eps) mu_k) / sqrt((1 - t_eps)^2 s^2 + t_eps^2) (docs/math.md, flow matching). The data
is an image folder with five class folders: its labels are the source's, and the store keeps them
whatever class the network was conditioned on."""

from __future__ import annotations

import textwrap

import numpy as np
import pytest
from PIL import Image

from pflatents.tasks.errors import InputError

S, T_EPS, CLASSES = 0.3, 1e-3, 5
MU = np.linspace(-0.5, 0.5, 16).reshape(1, 4, 4)

MODULE = textwrap.dedent(f"""
    import torch

    MU, S2 = {MU.ravel().tolist()!r}, {S}**2

    class ClassFlow(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gain = torch.nn.Parameter(torch.ones((), dtype=torch.float64))
            self.register_buffer("mu", torch.tensor(MU, dtype=torch.float64).reshape(1, 4, 4))

        def forward(self, x, label, cond):
            t = (label / 1000.0)[:, None, None, None]
            mu = self.mu * (cond[:, None, None, None] + 1).to(x.dtype)
            v = (1 - t) ** 2 * S2 + t ** 2
            return self.gain * (-mu + (t - (1 - t) * S2) / v * (x - (1 - t) * mu))

    class Plain(ClassFlow):
        def forward(self, x, label):
            return super().forward(x, label, torch.zeros(x.shape[0], dtype=torch.int64))

    def build():
        return ClassFlow(), {{"parameterization": "velocity", "schedule": {{"kind": "flow"}}, "sample_shape": [1, 4, 4],
                             "time_scale": 1000, "num_classes": {CLASSES}}}

    def plain():
        return Plain(), {{"parameterization": "velocity", "schedule": {{"kind": "flow"}}, "sample_shape": [1, 4, 4],
                         "time_scale": 1000}}
""")


@pytest.fixture()
def setup(tmp_path):
    """(model file, image folder, its labels in row order, an unlabelled .npy of the same pixels)."""
    (tmp_path / "nets.py").write_text(MODULE)
    rng = np.random.default_rng(0)
    labels = []
    for k in range(CLASSES):
        (tmp_path / "imgs" / f"c{k}").mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 256, (4, 4), dtype=np.uint8), mode="L").save(tmp_path / "imgs" / f"c{k}" / f"{i}.png")
            labels.append(k)
    return tmp_path / "nets.py", tmp_path / "imgs", np.array(labels), tmp_path


def _job(model, data, out, **kw):
    from pflatents.flows.coordinator import Job

    if data.startswith("imagefolder:"):
        kw["channels"] = 1
    return Job(data=data, model=f"py:{model}:build", out=str(out), sde="flow", dtype="float64",
               rtol=1e-9, atol=1e-9, t_eps=T_EPS, shard_size=4, **kw)


def _extract(job):
    """The job run shard by shard in this process (no Prefect): the store, read back."""
    from pflatents.flows.coordinator import make_store, prepare
    from pflatents.storage import LatentStore
    from pflatents.tasks.wrappers.extract import run_shards

    p = prepare(job.resolved())
    store = make_store(p)
    run_shards(p.url, list(range(store.n_shards)), device="cpu")
    return LatentStore.open(p.url, mode="r")


def _exact(x, k):
    return (x - (1 - T_EPS) * MU * (k + 1)) / np.sqrt((1 - T_EPS) ** 2 * S**2 + T_EPS**2)


def test_class_label_conditions_every_row_and_the_store_keeps_the_source_labels(setup):
    model, imgs, labels, tmp = setup
    src = _extract(_job(model, f"imagefolder:{imgs}", tmp / "src.zarr"))
    k3 = _extract(_job(model, f"imagefolder:{imgs}", tmp / "k3.zarr", class_label=3))
    k0 = _extract(_job(model, f"imagefolder:{imgs}", tmp / "k0.zarr", class_label=0))
    n = len(labels)
    z_src, z3, z0 = (np.asarray(s.latents_array()[:n], dtype=np.float64) for s in (src, k3, k0))
    from pflatents.tasks.data.sources import open_source

    x = open_source(f"imagefolder:{imgs}", channels=1).read(0, n).x.astype(np.float64)
    # the exact answer: every row under class 3 (resp. 0), whatever its folder
    np.testing.assert_allclose(z3, _exact(x, 3), rtol=0, atol=1e-6)
    np.testing.assert_allclose(z0, _exact(x, 0), rtol=0, atol=1e-6)
    np.testing.assert_allclose(z_src, _exact(x, labels[:, None, None, None]), rtol=0, atol=1e-6)
    # --class-label 3 gives a row of folder c3 exactly the latent its own label gives it; label 0 another
    rows3 = labels == 3
    assert np.array_equal(z3[rows3], z_src[rows3])
    assert np.abs(z3 - z0).min() > 0.1
    # the store's label array is the source's in all three; the config pins the conditioning class
    for s in (src, k3, k0):
        assert np.array_equal(np.asarray(s.read_ids_labels(0, n)[1]), labels)
    assert k3.config["class_label"] == 3 and k0.config["class_label"] == 0 and "class_label" not in src.config


def test_class_label_takes_an_unlabelled_source_and_is_pinned(setup):
    from pflatents.flows.coordinator import make_store, prepare

    model, imgs, labels, tmp = setup
    from pflatents.tasks.data.sources import open_source

    x = open_source(f"imagefolder:{imgs}", channels=1).read(0, len(labels)).x
    np.save(tmp / "x.npy", x)
    store = _extract(_job(model, str(tmp / "x.npy"), tmp / "u.zarr", class_label=2))
    z = np.asarray(store.latents_array()[:len(labels)], dtype=np.float64)
    np.testing.assert_allclose(z, _exact(x.astype(np.float64), 2), rtol=0, atol=1e-6)
    # without the flag the same store keeps class 2 (as resume does); another class is refused, naming it
    assert prepare(_job(model, str(tmp / "x.npy"), tmp / "u.zarr").resolved()).cfg.class_label == 2
    p = prepare(_job(model, str(tmp / "x.npy"), tmp / "u.zarr", class_label=4).resolved())
    from pflatents.storage.errors import ConfigMismatchError

    with pytest.raises(ConfigMismatchError, match="class_label: stored 2, new 4"):
        make_store(p)
    # and the unlabelled source without --class-label stays refused
    with pytest.raises(InputError, match="no labels.*--class-label"):
        prepare(_job(model, str(tmp / "x.npy"), tmp / "v.zarr").resolved())


@pytest.mark.parametrize("model_name,k,match", [
    ("build", 5, r"--class-label 5 is out of range: the model .* has 5 classes: 0 \.\. 4"),
    ("build", -1, r"--class-label -1 is out of range"),
    ("plain", 0, r"--class-label 0: the model .* is not class-conditional"),
])
def test_class_label_errors_exit_2_and_write_nothing(setup, capsys, model_name, k, match):
    from pflatents.flows.cli import main

    model, imgs, labels, tmp = setup
    out = tmp / "bad.zarr"
    rc = main(["extract", "--data", f"imagefolder:{imgs}", "--channels", "1", "--model", f"py:{model}:{model_name}",
               "--sde", "flow", "--out", str(out), "--class-label", str(k), "--no-progress"])
    assert rc == 2 and not out.exists()
    import re

    assert re.search(match, capsys.readouterr().err)
