"""`pflatents analyze` on stores of class-conditional models: every step that runs the model conditions
each row as extraction did (the store's label, or the pinned ``--class-label K``), and prior draws are
decoded under labels drawn from the compared rows' class mix (or K).

The exact model is a ``py:`` flow network holding the velocity of class-conditional Gaussians
N(mu_k, S^2 I) (the closed form of tests/test_class_label.py): decoding z under class k gives
x = (1 - t_eps) mu_k + c z, c = sqrt((1 - t_eps)^2 S^2 + t_eps^2), so the round trip is exact up to the
solver and a decode of a standard normal draw has mean (1 - t_eps) mu_k. The data is an image folder of
three class folders of unequal size whose images are drawn from those Gaussians. The diffusers case is a
tiny class-conditional ``UNet2DModel`` pipeline saved with ``save_pretrained``."""

from __future__ import annotations

import json
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from pflatents.flows.cli import main

S, T_EPS, CLASSES = 0.15, 1e-3, 3
COUNTS = (20, 40, 60)  # rows per class: an unequal class mix
MU_BASE = np.linspace(0.5, 1.0, 16)
MU = np.stack([0.4 * (k - 1) * MU_BASE for k in range(CLASSES)])  # (3, 16): mu_k, 0.2 .. 0.8 apart per dim

MODULE = textwrap.dedent(f"""
    import torch

    MU, S2 = {MU.tolist()!r}, {S}**2

    class ClassFlow(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gain = torch.nn.Parameter(torch.ones((), dtype=torch.float64))
            self.register_buffer("mu", torch.tensor(MU, dtype=torch.float64).reshape(-1, 1, 4, 4))

        def forward(self, x, label, cond):
            t = (label / 1000.0)[:, None, None, None]
            mu = self.mu[cond].to(x.dtype)
            v = (1 - t) ** 2 * S2 + t ** 2
            return self.gain * (-mu + (t - (1 - t) * S2) / v * (x - (1 - t) * mu))

    def build():
        return ClassFlow(), {{"parameterization": "velocity", "schedule": {{"kind": "flow"}}, "sample_shape": [1, 4, 4],
                             "time_scale": 1000, "num_classes": {CLASSES}}}
""")


def _folder(root, counts, size, draw):
    """An image folder c0, c1, ... with ``counts[k]`` grey ``size`` x ``size`` PNGs of class k; ``draw(k)``
    gives one image in [-1, 1]."""
    for k, n in enumerate(counts):
        (root / f"c{k}").mkdir(parents=True)
        for i in range(n):
            px = np.clip(np.rint((draw(k) + 1) * 127.5), 0, 255).astype(np.uint8).reshape(size, size)
            Image.fromarray(px, mode="L").save(root / f"c{k}" / f"{i:03d}.png")
    return root


def _extract(tmp, data, model, out, **kw):
    """The job run shard by shard in this process: the store's URL."""
    from pflatents.flows.coordinator import Job, make_store, prepare
    from pflatents.tasks.wrappers.extract import run_shards

    job = Job(data=f"imagefolder:{data}", channels=1, model=model, out=str(tmp / out), **kw)
    p = prepare(job.resolved())
    store = make_store(p)
    run_shards(p.url, list(range(store.n_shards)), device="cpu")
    return p.url


def _analyze(args, capsys) -> dict:
    capsys.readouterr()
    code = main(["analyze", *args, "--json"])
    out = capsys.readouterr()
    assert code == 0, out.err
    return json.loads(out.out)


def _redecode(url, labels):
    """The analysed rows' data and their stored latents decoded again, row i under ``labels[i]``
    (``labels`` a function of the rows' stored labels): max-abs error per row."""
    from pflatents.storage import LatentStore
    from pflatents.tasks.analysis.reconstruct import read_rows, reconstruct_rows
    from pflatents.tasks.data.sources import open_pinned
    from pflatents.tasks.models.registry import load_model
    from pflatents.tasks.wrappers.analyze import pinned_config, read_latents, recon_values

    store = LatentStore.open(url, mode="r")
    cfg = pinned_config(store)
    index = recon_values(store)["sample_index"]
    sde = cfg.make_sde()
    model = load_model(cfg.model.spec, sde, precision=cfg.precision)
    vals = reconstruct_rows(model, sde, read_latents(store, index).astype(np.float32),
                            read_rows(open_pinned(cfg.data), index), cfg.make_solver(), cfg.batch_size,
                            torch.device("cpu"), cfg.dtype, None, labels=labels(store.labels_at(index)))
    return vals["recon_max_abs"]


def _decodes(url):
    """The stored prior decodes (m, 16) and the class each was conditioned on."""
    import zarr

    g = zarr.open_group(url, path="analysis", mode="r")
    return np.asarray(g["prior_decodes"][:], np.float64), np.asarray(g["prior_decode_labels"][:])


@pytest.fixture(scope="module")
def gaussian_setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cond_gauss")
    (tmp / "nets.py").write_text(MODULE)
    rng = np.random.default_rng(0)
    _folder(tmp / "imgs", COUNTS, 4, lambda k: MU[k] + S * rng.standard_normal(16))
    return tmp


def _gauss_extract(tmp, out, **kw):
    return _extract(tmp, tmp / "imgs", f"py:{tmp / 'nets.py'}:build", out, sde="flow", dtype="float64",
                    rtol=1e-9, atol=1e-9, t_eps=T_EPS, shard_size=40, **kw)


def _class_means_match(dec, lab, classes):
    for k in classes:
        mean = dec[lab == k].mean(0)
        # the closed form: (1 - t_eps) mu_k; the standard error is ~S / sqrt(n_k) <= 0.03 here
        np.testing.assert_allclose(mean, (1 - T_EPS) * MU[k], rtol=0, atol=0.1)
        # and not another class's (0.2 or more apart in every dim)
        assert all(np.abs(mean - (1 - T_EPS) * MU[j]).max() > 0.15 for j in range(CLASSES) if j != k)


def test_analyze_conditions_on_each_rows_label_and_prior_draws_on_the_class_mix(gaussian_setup, prefect_api, capsys):
    tmp = gaussian_setup
    url = _gauss_extract(tmp, "src.zarr")
    s = _analyze([url, "--reconstruct", "60", "--prior", "300", "--stability", "10", "--report",
                  str(tmp / "report")], capsys)
    rec = s["reconstruction"]
    assert rec["n_checked"] == 60 and rec["n_solver_failures"] == 0
    assert rec["max_abs_error"] < 1e-4  # the exact flow, row i decoded under row i's label
    # negative control: the same latents decoded under the next class are off by |mu_k+1 - mu_k| >= 0.2
    assert _redecode(url, lambda lab: lab).max() < 1e-4
    assert _redecode(url, lambda lab: (lab + 1) % CLASSES).min() > 0.15
    # re-encoding for stability conditions like extraction: the drift is the solver's, not a class's
    assert s["stability"]["failed"] == 0 and s["stability"]["p99"] < 1e-4
    # prior decodes: one label per draw, drawn from the compared rows' class frequencies
    p = s["prior"]
    assert p["conditioned_on"] == "labels drawn from the data's class frequencies" and p["n_decode_failures"] == 0
    dec, lab = _decodes(url)
    assert dec.shape == (300, 16) and set(np.unique(lab)) == {0, 1, 2}
    from pflatents.storage import LatentStore
    from pflatents.tasks.wrappers.realism import comparison_rows

    store = LatentStore.open(url, mode="r")
    held = comparison_rows(store, [[0, sum(COUNTS)]], 300, 0)[1]
    want = np.bincount(store.labels_at(held), minlength=CLASSES) / len(held)
    np.testing.assert_allclose(np.bincount(lab, minlength=CLASSES) / len(lab), want, rtol=0, atol=0.08)
    _class_means_match(dec, lab, range(CLASSES))
    # the answer and the report say what the decodes were conditioned on
    assert "conditioned on labels drawn from the data's class frequencies" in s["answers"]["realism"]["answer"]
    assert "conditioned on labels drawn from the data's class frequencies" in (tmp / "report" / "report.md").read_text()


def test_analyze_store_with_pinned_class_label(gaussian_setup, prefect_api, capsys):
    tmp = gaussian_setup
    url = _gauss_extract(tmp, "k2.zarr", class_label=2)
    s = _analyze([url, "--reconstruct", "40", "--prior", "200"], capsys)
    # every row was encoded under class 2: decoding under the stored (source) labels would miss rows of c0, c1
    assert s["reconstruction"]["max_abs_error"] < 1e-4
    assert _redecode(url, lambda lab: lab).max() > 0.15
    assert s["prior"]["conditioned_on"] == "class 2 (--class-label)"
    dec, lab = _decodes(url)
    assert (lab == 2).all()
    _class_means_match(dec, lab, [2])


@pytest.fixture(scope="module")
def diffusers_mod():
    return pytest.importorskip("diffusers")


@pytest.mark.slow  # 0.5-1.5 min on 2 busy cores: float64 UNet evaluations through several ODE passes
def test_analyze_conditional_diffusers_unet(diffusers_mod, tmp_path, prefect_api, capsys):
    import tiny_diffusers as T

    sched = diffusers_mod.DDPMScheduler(num_train_timesteps=20, beta_schedule="squaredcos_cap_v2")
    pipe = T.save_pipeline(tmp_path / "pipe", T.cond_unet(diffusers_mod), sched)
    rng = np.random.default_rng(1)
    _folder(tmp_path / "imgs", (4, 3, 3), 8, lambda k: rng.uniform(-1, 1, 64))
    url = _extract(tmp_path, tmp_path / "imgs", f"diffusers:{pipe}", "u.zarr", dtype="float64", precision="fp64",
                   rtol=1e-7, atol=1e-7, t_eps=1e-3, shard_size=5)
    s = _analyze([url, "--reconstruct", "10", "--prior", "6"], capsys)
    # without labels the adapter raises; with each row's own label the round trip closes (this random
    # network is stiff near t_eps: a few 1e-3 at these tolerances), with the next class it is off by ~100s
    err = s["reconstruction"]["max_abs_error"]
    assert s["reconstruction"]["n_checked"] == 10 and s["reconstruction"]["n_solver_failures"] == 0 and err < 2e-2
    assert _redecode(url, lambda lab: (lab + 1) % 3).min() > 100 * err
    p = s["prior"]
    assert "skipped" not in p and p["conditioned_on"] == "labels drawn from the data's class frequencies"
    assert p["n_decode_failures"] == 0 and p["n_decodes"] == 6
