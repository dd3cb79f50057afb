"""`pflatents analyze` answers the three questions: the answers open the JSON and the report, prior
decodes are checked by default (`--prior 0` skips), and a checkpoint trained with --holdout gets its
training and held-out rows compared side by side."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy import stats

from pflatents.flows.cli import main
from pflatents.tasks.analysis.answers import answers, ica_sentence
from pflatents.tasks.data.sources import open_source
from pflatents.tasks.ode.sde import VPSDE
from pflatents.tasks.training.train import TrainConfig, train_checkpoint


def _analyze(args, capsys):
    capsys.readouterr()
    code = main(["analyze", *args, "--json"])
    out = capsys.readouterr()
    return code, (json.loads(out.out) if code == 0 else None), out.err


def test_holdout_checkpoint_prior_decodes_and_answers(tmp_path, prefect_api, capsys):
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(600, 3)) * [1.0, 0.5, 0.2] + [0.5, 0.0, -0.3]).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    cfg = TrainConfig(arch_params={"hidden": 32, "depth": 1, "emb_dim": 8}, steps=150, batch_size=128, seed=1)
    train_checkpoint(open_source(str(tmp_path / "x.npy")), VPSDE(), cfg, tmp_path / "m", holdout=0.25)
    out = str(tmp_path / "s.zarr")
    assert main(["extract", "--data", str(tmp_path / "x.npy"), "--model", str(tmp_path / "m"), "--out", out,
                 "--solver", "rk4", "--steps", "12", "--shard-size", "300", "--no-progress"]) == 0
    code, s, err = _analyze([out, "--prior", "120", "--reconstruct", "40", "--report", str(tmp_path / "rep")], capsys)
    assert code == 0, err
    assert list(s)[0] == "answers" and set(s["answers"]) == {"realism", "bijection", "independence"}
    for a in s["answers"].values():
        assert a["answer"] and a["would_change"]
    p = s["prior"]
    assert p["m"] == 120 and p["compared_with"].startswith("held-out") and p["n_heldout"] == 120
    for key in ("mmd", "mmd_p", "c2st_accuracy", "nn_distance_ratio"):
        assert isinstance(p[key], float), key
    assert 0 < p["nn_distance_ratio"] < 3 and 0 <= p["mmd_p"] <= 1
    sp = s["splits"]
    assert sp["known"] and sp["train"]["n"] == 450 and sp["heldout"]["n"] == 150
    assert sp["train"]["round_trip_n_checked"] + sp["heldout"]["round_trip_n_checked"] == 40
    assert 0 < sp["heldout"]["round_trip_max_abs_error"] < 0.1
    assert sp["eval_loss_heldout"] > 0 and "training vs held-out" in s["answers"]["independence"]["answer"]
    md = (tmp_path / "rep" / "report.md").read_text()
    first_screen = md[:md.index("| statistic |")]
    assert "Does every prior draw decode" in first_screen and "Is the map a bijection?" in first_screen
    assert "Training rows vs held-out rows" in md
    assert "<table>" in (tmp_path / "rep" / "report.html").read_text()
    code, s0, err = _analyze([out, "--prior", "0", "--overwrite"], capsys)
    assert code == 0 and s0["prior"] == {"skipped": "--prior 0"} and s0["answers"]["realism"]["answer"] == "not checked"
    code, _, err = _analyze([out, "--prior", "-3", "--overwrite"], capsys)
    assert code == 2 and "--prior" in err


def _row(name, sq, kurt, rejecting=(), amari=None):
    return {"representation": name, "max_abs_corr_of_squares": sq, "corr_threshold": 0.02,
            "mean_abs_excess_kurtosis": kurt, "kurtosis_threshold": 0.07,
            "dependence_tests_rejecting": list(rejecting), "amari_distance": amari}


def test_ica_sentence_says_which_representation_is_less_dependent():
    laplace = ica_sentence([_row("FastICA(data)", 0.014, 3.2, amari=0.007),
                            _row("PF-ODE latents", 0.01, 0.04, amari=0.51)])
    assert "Neither representation" in laplace and "FastICA's components are not (ICA found" in laplace
    assert "0.007 for FastICA" in laplace
    dep = ica_sentence([_row("FastICA(data)", 0.3, 2.0, ["HSIC"]), _row("PF-ODE latents", 0.05, 0.5, ["HSIC"])])
    assert dep.startswith("The PF-ODE latents have the weaker nonlinear dependence") and "are not Gaussian-like" in dep


def _null_independence(n, d, seed=0):
    from pflatents.tasks.analysis.stats import StatsConfig, compute_stats
    from pflatents.tasks.analysis.summary import summarise

    x = np.random.default_rng(seed).normal(size=(n, d))
    return summarise(compute_stats(x, StatsConfig(), scheduler="sync"), [], StatsConfig())["independence"]


@pytest.mark.slow  # ~8-19 s: outside make test-fast's ~2 min, still in make test
def test_bijection_answer_names_the_degenerate_direction():
    s = {"n_samples": 1000, "n_dims": 63, "alpha": 0.05, "normality": {"n_dims_failing": 0},
         "independence": _null_independence(1000, 63),
         "data": {"available": True, "rank": 63, "dims": 64, "n_degenerate": 1},
         "latent": {"degenerate_part": [{"direction": "the all-ones direction over 64 dims", "latent_variance": 0.27,
                                         "prior_variance": 1.0}]},
         "reconstruction": {"max_abs_error": None}, "prior": {"skipped": "--prior 0"}}
    a = answers({**s, "stability": {"n": 50, "p99": 2e-3, "target": 1e-3, "meets_target": False}})
    assert "moves the latents by 0.002 (p99; target 0.001: missed)" in a["bijection"]["answer"]
    assert "tighter extraction tolerance" in a["bijection"]["would_change"]
    a = answers(s)
    assert a["bijection"]["answer"].startswith("no, not onto R^64: the data span 63 of 64 dims")
    assert "variance 0.27 instead of 1" in a["bijection"]["answer"]
    b = a["bijection"]
    assert b["kind"] == "no" and b["level"] == 0.05 and b["deciding"]["value"] < 1e-10
    assert b["effect"]["unit"] == "variance ratio" and b["effect"]["ci"][0] < 0.27 < b["effect"]["ci"][1]
    assert 0.8 < b["mde"]["value"] < 1  # 1000 rows see a variance shrunk by ~15 %
    ind = a["independence"]
    assert ind["answer"].startswith("yes: no dependence detected at N = 1000") and ind["kind"] == "yes"
    assert ind["level"] == 0.05 and ind["deciding"]["value"] >= 0.05 and ind["effect"]["unit"] == "nats"
    # Bartlett at 0.05/5, m = 1953 pairs: the noncentrality seen 80 % of the time is about
    # (z_{1-a} + z_0.8) sqrt(2m) (normal approximation), TC = noncentrality / (2 n')
    ref = (stats.norm.isf(0.05 / 5) + stats.norm.ppf(0.8)) * np.sqrt(2 * 1953) / (2 * (1000 - 1 - 131 / 6))
    assert ind["mde"]["value"] == pytest.approx(ref, rel=0.1)
    assert ind["mde"]["pair_corr"] == pytest.approx((stats.norm.isf(0.05 / 5 / 2 / 1953) + 0.8416) / np.sqrt(1000), rel=1e-4)
    assert a["realism"]["kind"] == "not checked" and a["realism"]["level"] is None


def test_independence_answer_has_three_kinds():
    """'no' with the effect and its interval, 'yes' with the detectable size, 'cannot tell' on too few rows."""
    from pflatents.tasks.analysis.answers import decision_line

    def answer(x, **extra):
        from pflatents.tasks.analysis.stats import StatsConfig, compute_stats
        from pflatents.tasks.analysis.summary import summarise

        from pflatents.tasks.analysis.dependence import total_dependence

        s = summarise(compute_stats(x, StatsConfig(), scheduler="sync"), [], StatsConfig())
        s["independence"]["total_dependence"] = total_dependence(x)
        return answers({**s, "prior": {"skipped": "--prior 0"}, **extra})["independence"]

    rng = np.random.default_rng(4)
    few = answer(rng.normal(size=(40, 8)))
    assert few["kind"] == "cannot tell" and few["answer"].startswith("cannot tell: not enough rows")
    assert few["mde"]["pair_corr"] > 0.5 and "more rows" in few["would_change"]
    x = rng.normal(size=(3000, 4))
    x[:, 1] = 0.5 * (x[:, 0] ** 2 - 1) / np.sqrt(2) + np.sqrt(1 - 0.25) * x[:, 1]  # uncorrelated, dependent
    dep = answer(x)
    assert dep["kind"] == "no" and dep["answer"].startswith("no: dependent at level 0.05")
    assert dep["deciding"]["value"] < 0.05 and dep["effect"]["unit"] == "nats"
    assert dep["effect"]["ci"][0] > 0.02 and dep["effect"]["parts"]["non_gaussian"] > dep["effect"]["parts"]["gaussian"]
    line = decision_line(dep)
    assert line.startswith("no at level 0.05; combined p") and "minimum detectable effect" in line
    ok = answer(rng.normal(size=(3000, 4)))
    assert ok["kind"] == "yes" and "would have been detected with 80% probability" in ok["answer"]
