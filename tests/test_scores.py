"""pflatents.tasks.models.scores: the exact GMM score and density, the network adapters, and model-file validation."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from problems import SDES, make_adapters, random_gmm, t64
from pflatents.tasks.errors import DataError, ModelError
from pflatents.tasks.models.scores import GaussianMixtureScore, load_gmm

F64 = torch.float64
TIMES = {"vp": [1e-5, 1e-3, 0.1, 0.5, 1.0], "ve": [1e-5, 1e-3, 0.1, 0.5, 1.0], "edm": [1e-5, 1e-2, 1.0, 10.0, 80.0]}


@pytest.fixture(scope="module")
def gmm():
    return random_gmm(d=3, k=3, seed=0)


@pytest.fixture(scope="module")
def x(gmm):
    return gmm.sample(6, seed=1)


def full_t(t: float, n: int) -> torch.Tensor:
    return torch.full((n,), t, dtype=F64)


@pytest.mark.parametrize("name", ["vp", "ve", "edm"])
def test_log_prob_matches_independent_density(gmm, x, name):
    sde = SDES[name]()
    m = gmm.model(sde)
    for t in TIMES[name]:
        np.testing.assert_allclose(m.log_prob(t64(x), full_t(t, len(x))).numpy(), gmm.log_prob(sde, x, t), rtol=1e-12)


@pytest.mark.parametrize("name", ["vp", "ve", "edm"])
def test_score_is_gradient_of_log_prob(gmm, x, name):
    """Analytic score == central finite differences of log_prob, float64."""
    sde = SDES[name]()
    m = gmm.model(sde)
    for t in TIMES[name]:
        tt = full_t(t, len(x))
        xs = t64(x) * sde.alpha(tt)[:, None]  # points where p_t has its mass
        h = 1e-5 * float(sde.alpha(torch.tensor(t)) ** 2 * 0.1 + sde.sigma(torch.tensor(t)) ** 2) ** 0.5
        eye = torch.eye(3, dtype=F64)
        grad = torch.stack([(m.log_prob(xs + h * e, tt) - m.log_prob(xs - h * e, tt)) / (2 * h) for e in eye], 1)
        score = m(xs, tt)
        scale = score.abs().max()
        torch.testing.assert_close(score, grad, rtol=1e-6, atol=1e-6 * scale)


@pytest.mark.parametrize("name", ["vp", "ve"])
def test_score_per_sample_times_and_shapes(gmm, x, name):
    """Each row uses its own t; image-shaped input (B, 1, 3) gives the same numbers reshaped."""
    sde = SDES[name]()
    m = gmm.model(sde)
    t = torch.tensor([1e-5, 1e-3, 0.1, 0.3, 0.7, 1.0], dtype=F64)
    got = m(t64(x), t)
    for i in range(len(x)):
        np.testing.assert_allclose(got[i].numpy(), gmm.score(sde, x[i : i + 1], t[i].item())[0], rtol=1e-11, atol=1e-13)
    torch.testing.assert_close(m(t64(x).reshape(6, 1, 3), t), got.reshape(6, 1, 3))
    g32 = m(t64(x).float(), t)
    assert g32.dtype == torch.float32
    torch.testing.assert_close(g32.double(), got, rtol=1e-4, atol=1e-5)


# ---- network adapters built from the exact score -------------------------------------------------

@pytest.mark.parametrize("adapter", ["eps", "v", "denoiser"])
@pytest.mark.parametrize("name", ["vp", "ve"])
def test_adapters_reproduce_exact_score(gmm, x, name, adapter):
    sde = SDES[name]()
    m = gmm.model(sde)
    model = make_adapters(m, gmm)[adapter]
    for t in TIMES[name]:
        tt, xs = full_t(t, len(x)), t64(x) * sde.alpha(torch.tensor(t))
        s2 = sde.sigma(tt)[:, None] ** 2
        exact = m(xs, tt)
        torch.testing.assert_close(model.sigma2_score(xs, tt), s2 * exact, rtol=1e-11, atol=1e-13)
        # the plain score divides by sigma^2 (1e-6 at VP t=1e-5): allow the cancellation eps |x| / sigma^2
        atol = 1e-14 * float(xs.abs().max() / s2.min())
        torch.testing.assert_close(model(xs, tt), exact, rtol=1e-10, atol=max(atol, 1e-13))


# ---- model files and validation -----------------------------------------------------------------

def test_json_round_trip_and_hash(gmm, tmp_path):
    p = tmp_path / "gmm.json"
    p.write_text(json.dumps(gmm.to_json()))
    sde = SDES["vp"]()
    m1, m2 = load_gmm(p, sde), gmm.model(sde)
    xs, t = torch.randn(4, 3, dtype=F64), torch.full((4,), 0.2, dtype=F64)
    torch.testing.assert_close(m1(xs, t), m2(xs, t), rtol=1e-14, atol=1e-15)
    assert m1.content_hash == m2.content_hash and len(m1.content_hash) == 64
    doc = m1.to_json()
    np.testing.assert_allclose(np.array(doc["covariances"]), gmm.covs, atol=1e-14)
    other = random_gmm(d=3, k=3, seed=1).model(sde)
    assert other.content_hash != m1.content_hash


def write(tmp_path, doc) -> str:
    p = tmp_path / "model.json"
    p.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return str(p)


def test_malformed_json_names_file(tmp_path):
    p = write(tmp_path, '{"weights": [1.0], "means": [[0.0]],')
    with pytest.raises(ModelError, match=r"malformed JSON.*" + re.escape(p)):
        GaussianMixtureScore.from_json(p, SDES["vp"]())


def test_missing_file_and_missing_keys(tmp_path):
    with pytest.raises(ModelError, match="not found.*nope.json"):
        load_gmm(tmp_path / "nope.json", SDES["vp"]())
    with pytest.raises(ModelError, match="'covariances'"):
        load_gmm(write(tmp_path, {"weights": [1.0], "means": [[0.0]]}), SDES["vp"]())


GOOD = {"weights": [0.25, 0.75], "means": [[0.0, 0.0], [1.0, 1.0]], "covariances": [np.eye(2).tolist(), np.eye(2).tolist()]}


def bad(**change):
    return {**GOOD, **change}


@pytest.mark.parametrize("doc, message", [
    (bad(covariances=[np.eye(2).tolist(), [[1.0, 2.0], [2.0, 1.0]]]), r"covariances\[1\] is not symmetric positive definite"),
    (bad(covariances=[[[1.0, 0.5], [0.0, 1.0]], np.eye(2).tolist()]), r"covariances\[0\] is not symmetric"),
    (bad(weights=[1.25, -0.25]), r"weights\[1\] = -0.25"),
    (bad(weights=[0.5, 0.4]), r"sum to 1; they sum to 0.9"),
    (bad(weights=[]), r"'weights' must be a non-empty"),
    (bad(means=[[0.0, 0.0]]), r"'means' must have shape \[K=2\]"),
    (bad(covariances=[np.eye(3).tolist()] * 2), r"'covariances' must have shape \[K=2\]\[D=2\]\[D=2\]"),
    (bad(means=[[0.0, float("nan")], [1.0, 1.0]]), r"'means' contains NaN"),
    (bad(weights=["a", "b"]), r"numeric arrays"),
])
def test_invalid_parameters_are_named(tmp_path, doc, message):
    p = write(tmp_path, doc)
    with pytest.raises(ModelError, match=message) as err:
        load_gmm(p, SDES["vp"]())
    assert p in str(err.value)  # the message names the file


def test_dimension_mismatch_is_a_data_error(gmm):
    m = gmm.model(SDES["vp"]())
    with pytest.raises(DataError, match=r"\(4,\) \(4 values\).*D = 3"):
        m(torch.zeros(2, 4, dtype=F64), torch.full((2,), 0.5, dtype=F64))
    with pytest.raises(DataError, match="D = 3"):
        m(torch.zeros(3, dtype=F64), torch.full((3,), 0.5, dtype=F64))
