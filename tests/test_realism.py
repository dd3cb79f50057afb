"""Realism of prior decodes: MMD and C2ST calibrated on one distribution and rejecting shifted ones;
the nearest-neighbour ratio flags copies of the training set."""

from __future__ import annotations

import numpy as np
import pytest

from pflatents.tasks.analysis.realism import c2st, mmd_test, nn_distance_ratio, realism, requantise


def test_mmd_matches_the_kernel_formula():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(30, 3)), rng.normal(size=(40, 3)) + 0.3
    r = mmd_test(x, y, permutations=10)
    z = np.concatenate([x, y])
    d2 = ((z[:, None] - z[None]) ** 2).sum(-1)
    bw2 = np.median(d2[np.triu_indices(70, 1)])
    k = np.exp(-d2 / bw2)
    kxx, kyy, kxy = k[:30, :30], k[30:, 30:], k[:30, 30:]
    ref = ((kxx.sum() - np.trace(kxx)) / (30 * 29) + (kyy.sum() - np.trace(kyy)) / (40 * 39) - 2 * kxy.mean())
    assert r["mmd"] == pytest.approx(ref, rel=1e-10) and r["bandwidth"] == pytest.approx(np.sqrt(bw2))


def test_two_sample_tests_hold_their_level_and_reject_shifts():
    rng = np.random.default_rng(1)
    p_mmd, p_c2st, acc = [], [], []
    for seed in range(40):
        x, y = rng.normal(size=(120, 8)), rng.normal(size=(120, 8))
        p_mmd.append(mmd_test(x, y, permutations=99, seed=seed)["mmd_p"])
        c = c2st(x, y, seed=seed)
        p_c2st.append(c["c2st_p"])
        acc.append(c["c2st_accuracy"])
    assert np.mean(np.asarray(p_mmd) < 0.05) <= 0.125 and np.mean(np.asarray(p_c2st) < 0.05) <= 0.125
    assert abs(np.mean(acc) - 0.5) < 0.03
    x = rng.normal(size=(300, 8))
    shifted = rng.normal(size=(300, 8)) + 0.3  # mean moved by 0.85 sd in all
    wider = rng.normal(size=(300, 8)) * 1.4
    for y in (shifted, wider):
        assert mmd_test(x, y, permutations=99)["mmd_p"] == 0.01
        c = c2st(x, y)
        assert c["c2st_p"] < 0.01 and c["c2st_accuracy"] > 0.54


def test_nearest_neighbour_ratio_flags_memorisation():
    rng = np.random.default_rng(2)
    train, held = rng.normal(size=(2000, 6)), rng.normal(size=(200, 6))
    fresh = nn_distance_ratio(rng.normal(size=(200, 6)), held, train)["nn_distance_ratio"]
    copies = train[rng.choice(2000, 200)] + 0.01 * rng.normal(size=(200, 6))
    memorised = nn_distance_ratio(copies, held, train)
    assert 0.85 < fresh < 1.15 and memorised["nn_distance_ratio"] < 0.05
    assert memorised["fraction_decodes_closer_than_heldout_p1"] > 0.9


def test_quantised_decodes_are_compared_on_the_data_grid():
    grid = requantise(np.array([[-1.2, -0.49, 0.0, 0.51, 2.0]]), 5)
    np.testing.assert_allclose(grid, [[-1.0, -0.5, 0.0, 0.5, 1.0]])
    rng = np.random.default_rng(3)
    data = requantise(rng.uniform(-1, 1, size=(400, 4)), 17)
    decodes = rng.uniform(-1, 1, size=(200, 4))  # the same law before rounding
    r = realism(decodes, data[:200], data[200:], quantization=17)
    assert r["requantised"] and r["mmd_p"] > 0.01 and not r["distinguishable"]
    assert set(r) >= {"mmd", "mmd_p", "c2st_accuracy", "nn_distance_ratio"}


def test_fewer_prior_draws_than_dimensions_still_compare():
    """8 decodes of 192-dim images (the SVD QDA refused them with a LinAlgError): the shrinkage QDA
    (one variance per class) fits, a clear difference is still told apart, and the summary's table and answer render."""
    from pflatents.tasks.analysis.answers import _realism
    from pflatents.tasks.analysis.report import _prior_blocks

    rng = np.random.default_rng(4)
    held, train = rng.normal(size=(8, 192)), rng.normal(size=(50, 192))
    same = realism(rng.normal(size=(8, 192)), held, train, None)
    assert "QDA, one variance per class (fewer samples than dimensions)" in same["c2st_classifier"]
    assert 0.0 <= same["c2st_accuracy"] <= 1.0 and not same["distinguishable"]
    wide = realism(3.0 * rng.normal(size=(8, 192)), held, train, None)
    assert wide["distinguishable"] and wide["c2st_accuracy"] >= 0.75  # scored on the 8 held-out rows
    prior = {"m": 8, "compared_with": "data rows", "n_decode_failures": 0, **same}
    assert "classifier accuracy" in _realism({"prior": prior})["answer"]
    assert "one variance per class" in "\n".join(_prior_blocks({"prior": prior}))


def test_too_few_draws_say_why_instead_of_failing():
    rng = np.random.default_rng(5)
    held, train = rng.normal(size=(8, 5)), rng.normal(size=(50, 5))
    two = realism(rng.normal(size=(2, 5)), held, train, None)
    assert two["c2st_accuracy"] is None and two["c2st_p"] is None
    assert two["c2st_classifier"].startswith("not run: 2 decodes and 8 data rows") and two["mmd_p"] is not None
    one = realism(rng.normal(size=(1, 5)), held, train, None)
    assert one["skipped"].startswith("1 decodes (without solver failures) and 8 data rows")
    from pflatents.tasks.analysis.answers import _realism
    from pflatents.tasks.analysis.report import _prior_blocks, summary_table

    assert _realism({"prior": {"m": 1, **one}})["answer"] == "not checked"
    assert "Not run: 1 decodes" in "\n".join(_prior_blocks({"prior": one}))
    row = [ln for ln in summary_table(_summary({"m": 2, **two})).splitlines() if "classifier accuracy" in ln]
    assert row and "not run" in row[0]


def _summary(prior: dict) -> dict:
    """A summary around a prior block; the statistics summary_table also reads are zeros."""
    from collections import defaultdict

    return {"n_samples": 100, "n_dims": 5, "normality": defaultdict(float), "independence": defaultdict(float),
            "prior": prior, "verdict": "-"}


def test_realism_verdict_holds_its_level_and_states_its_effect():
    """One decision at alpha (MMD and classifier, Bonferroni): on true samples at most ~alpha false
    alarms; a wider spread is found, with the classifier accuracy's interval and the detectable accuracy."""
    from pflatents.tasks.analysis.answers import _realism

    alarms = 0
    for seed in range(60):
        rng = np.random.default_rng([seed, 26])
        r = realism(rng.normal(size=(80, 4)), rng.normal(size=(80, 4)), rng.normal(size=(500, 4)), None, seed, 0.05)
        assert r["distinguishable"] == (r["p"] < 0.05) and r["p"] == min(1.0, 2 * min(r["mmd_p"], r["c2st_p"]))
        alarms += r["distinguishable"]
    assert alarms <= 8, alarms  # P(>= 9 of 60 | 0.05) ~ 0.008
    rng = np.random.default_rng(3)
    wide = realism(rng.normal(size=(300, 4)) * 1.4, rng.normal(size=(300, 4)), rng.normal(size=(500, 4)), None, 0, 0.05)
    a = _realism({"alpha": 0.05, "prior": {"m": 300, "compared_with": "held-out rows", **wide}})
    assert a["kind"] == "no" and a["level"] == 0.05 and a["deciding"]["value"] < 0.05
    lo, hi = a["effect"]["ci"]
    assert 0.5 < lo < a["effect"]["value"] < hi and a["effect"]["unit"] == "accuracy"
    assert 0.55 < a["mde"]["value"] < 0.65  # 300 held-out rows: the binomial test at 0.05/4 sees ~0.6 with 80 % power
