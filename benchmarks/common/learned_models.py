"""Learned models for the benchmark cases (learned, learned_teps, precision): data, training, float64 references.

Models are trained with the project's own training code (``train_checkpoint``) on bundled data and
cached under ``benchmarks/out/learned/`` (git-ignored; delete it to retrain):

- ``digits``: scikit-learn's 8x8 digits (17 grey levels), residual MLP;
- ``patches``: 8x8 grey patches (8-bit luma) of scikit-learn's two sample photos, residual MLP;
- ``patches0``: the same patches with each patch's mean removed: every sample lies in the 63-dim
  subspace orthogonal to (1, ..., 1), a degenerate direction the network has to learn;
- ``colour``: 8x8x3 colour patches of the same photos, the project's small U-Net.

Held-out samples (never trained on) are encoded. The reference is float64 end to end: weights,
time label, preconditioning and state, integrated by our dopri5 (latent-unit control, plain t) at rtol = atol =
1e-10; its convergence is shown against the same at 1e-8.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import measure
from benchmarks.common.report import log
from pflatents.tasks.data.sources import ArraySource
from pflatents.tasks.models.adapters import DeviceNet
from pflatents.tasks.models.checkpoint import load_checkpoint
from pflatents.tasks.models.scores import EpsScore
from pflatents.tasks.ode.pfode import SolverConfig, decode, encode
from pflatents.tasks.ode.sde import VPSDE
from pflatents.tasks.training.train import TrainConfig, train_checkpoint

F64 = torch.float64
OUT = Path(__file__).resolve().parents[1] / "out" / "learned"
REF_TOLS = (1e-8, 1e-10)


def _photos_luma() -> list[np.ndarray]:
    from sklearn.datasets import load_sample_images

    return [np.rint(im.astype(np.float64) @ [0.299, 0.587, 0.114]) for im in load_sample_images().images]


def _patches(n: int, seed: int, colour: bool) -> np.ndarray:
    """n random 8x8 patches, 8-bit values scaled to [-1, 1]: (n, 64) grey or (n, 3, 8, 8) colour."""
    from sklearn.datasets import load_sample_images

    ims = load_sample_images().images if colour else _photos_luma()
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        im = ims[i % len(ims)]
        r, c = rng.integers(0, im.shape[0] - 8), rng.integers(0, im.shape[1] - 8)
        p = im[r:r + 8, c:c + 8].astype(np.float64) / 127.5 - 1.0
        out.append(p.transpose(2, 0, 1) if colour else p.reshape(64))
    return np.stack(out).astype(np.float32)


def dataset(name: str, n_train: int, n_test: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) arrays for a model name; seeded."""
    if name == "digits":
        from sklearn.datasets import load_digits

        x = load_digits().data.astype(np.float32) / 8 - 1
        perm = np.random.default_rng(0).permutation(len(x))
        return x[perm[n_test:]], x[perm[:n_test]]
    x = _patches(n_train + n_test, seed=0, colour=name == "colour")
    if name == "patches0":
        x = x - x.mean(axis=1, keepdims=True)
    return x[n_test:], x[:n_test]


SPECS = {  # name: (arch, arch params, training steps, training samples)
    "digits": ("mlp", {}, 800, None),
    "patches": ("mlp", {}, 800, 20000),
    "patches0": ("mlp", {}, 800, 20000),
    "colour": ("unet", {"base": 16, "mults": [1, 2]}, 300, 20000),
}


def trained(name: str, n_test: int = 64, log=log) -> tuple[Path, np.ndarray]:
    """The cached checkpoint dir for ``name`` (trained on first use) and its held-out samples."""
    arch, params, steps, n_train = SPECS[name]
    train, test = dataset(name, n_train or 0, n_test)
    path = OUT / name
    if not (path / "config.json").is_file():
        log(f"training {name}: {arch}, {steps} steps on {len(train)} samples ...")
        cfg = TrainConfig(arch=arch, arch_params=params, steps=steps, batch_size=256, seed=0)
        train_checkpoint(ArraySource(f"bench:{name}", train), VPSDE(), cfg, path)
    return path, test


@dataclass
class Model:
    """A trained checkpoint's score at float32 and float64 network evaluation, and the label-rounded variant."""

    name: str
    sde: VPSDE
    sample_shape: tuple[int, ...]
    scores: dict  # "float32" / "float64" -> score model whose network runs in that dtype
    rounded_label: object  # float32 network fed a float32-rounded time label (the behaviour before the fix)


def load(path: Path) -> Model:
    ck = load_checkpoint(path)
    sde = ck.sde
    net32 = ck.module.float()
    net64 = copy.deepcopy(ck.module).double()
    scores = {"float32": EpsScore(DeviceNet(net32), sde, time_fn=sde.s_of_t),
              "float64": EpsScore(DeviceNet(net64), sde, time_fn=sde.s_of_t)}
    rounded = EpsScore(DeviceNet(copy.deepcopy(net32)), sde, time_fn=lambda t: sde.s_of_t(t).float().double())
    return Model(path.name, sde, tuple(ck.sample_shape), scores, rounded)


def ref_cfg(tol: float, t_eps: float) -> SolverConfig:
    # latent-unit control: tight where the flow amplifies errors; plain local control at 1e-12 chased
    # float64 rounding noise in the network for tens of thousands of steps
    return SolverConfig("dopri5", rtol=tol, atol=tol, t_eps=t_eps, time_var="t", control="latent", max_steps=20_000)


def sample_err(x: torch.Tensor, ref: torch.Tensor) -> np.ndarray:
    """Per-sample max-abs error (float64), as numpy."""
    return measure.sample_err(x, ref).numpy()


def reference(m: Model, x0: np.ndarray, t_eps: float, log=log) -> dict:
    """float64 latents z_ref of x0 and decodes of z_ref, at two tolerances; cached as .npz per t_eps."""
    f = OUT / m.name / f"ref_teps{t_eps:g}_n{len(x0)}.npz"
    if f.is_file():
        d = dict(np.load(f))
        return {k: torch.from_numpy(v) for k, v in d.items() if k not in ("conv_enc", "conv_dec", "nfe")} | {
            "conv_enc": d["conv_enc"], "conv_dec": d["conv_dec"], "nfe": d["nfe"]}
    x = torch.from_numpy(x0).to(F64)
    sc = m.scores["float64"]
    zs, xs, nfe = [], [], []
    with torch.inference_mode():
        for tol in REF_TOLS:
            r = encode(sc, m.sde, x, ref_cfg(tol, t_eps))
            assert bool(r.ok.all()), f"reference encode failed at tol {tol}"
            zs.append(r.x)
            nfe.append(float(r.nfe.double().mean()))
            log(f"  reference {m.name} t_eps {t_eps:g} encode tol {tol:g}: NFE {nfe[-1]:.0f} max {int(r.nfe.max())}")
        for tol in REF_TOLS:  # decode the tighter latents
            r = decode(sc, m.sde, zs[-1], ref_cfg(tol, t_eps))
            xs.append(r.x)
    conv_enc, conv_dec = sample_err(zs[0], zs[1]), sample_err(xs[0], xs[1])
    log(f"  reference {m.name} t_eps {t_eps:g}: NFE {nfe}, convergence enc max {conv_enc.max():.1e}, "
        f"dec max {conv_dec.max():.1e}")
    out = {"x0": x, "z_ref": zs[-1], "x_ref": xs[-1], "conv_enc": conv_enc, "conv_dec": conv_dec, "nfe": np.array(nfe)}
    f.parent.mkdir(parents=True, exist_ok=True)
    np.savez(f, **{k: (v.numpy() if torch.is_tensor(v) else v) for k, v in out.items()})
    return out
