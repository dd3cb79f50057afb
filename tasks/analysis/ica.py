"""The ICA comparison: FastICA on the data, the same statistics on its components, Amari distances,
and the total dependence each representation leaves (nats, with intervals; the latents' difference
to each other representation with a paired interval).

Exact PF-ODE latents approach N(0, I): they are independent in every rotation, so passing the
independence tests does not make them the sources; ICA recovers sources up to permutation, sign and
scale. The table shows both facts (docs/statistics.md, "The ICA comparison"). Pure numpy/sklearn.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
from scipy.stats import ortho_group

from pflatents.tasks.analysis.dependence import amari_distance, difference_ci, total_dependence
from pflatents.tasks.analysis.stats import StatsConfig, compute_stats
from pflatents.tasks.analysis.summary import independence_failures, summarise

__all__ = ["fit_ica", "mixing_to_sources", "representation_row", "ica_table"]


def fit_ica(x: np.ndarray, seed: int) -> np.ndarray:
    """FastICA components (unit variance) of ``x`` (N, D); as many as the data's numerical rank."""
    from sklearn.decomposition import FastICA

    x = np.asarray(x, dtype=np.float64)
    sv = np.linalg.svd(x - x.mean(0), compute_uv=False)
    rank = max(1, int((sv > 1e-6 * sv[0]).sum())) if sv[0] > 0 else 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence warnings: the table shows the outcome
        ica = FastICA(n_components=rank, whiten="unit-variance", random_state=seed, max_iter=1000)
        return ica.fit_transform(x)


def mixing_to_sources(y: np.ndarray, sources: np.ndarray) -> np.ndarray:
    """Least-squares linear map C with (y - mean) ~ (sources - mean) C."""
    s = sources - sources.mean(0)
    return np.linalg.lstsq(s, y - y.mean(0), rcond=None)[0]


def _standardise(y: np.ndarray) -> np.ndarray:
    """Zero mean, unit variance per column."""
    sd = y.std(0)
    return (y - y.mean(0)) / np.where(sd > 0, sd, 1.0)


def representation_row(name: str, y: np.ndarray, sources: np.ndarray | None, cfg: StatsConfig,
                       standardise: bool, dependence: bool = True, matrices: dict[str, Any] | None = None
                       ) -> dict[str, Any]:
    """The comparison figures of one representation (rows N, dims D); with ``dependence`` also the
    total dependence left (nats, with an interval: ``dependence.total_dependence``); ``matrices`` (a
    dict) receives its correlation matrix and that of its squares under ``name``."""
    y = np.asarray(y, dtype=np.float64).reshape(len(y), -1)
    z = _standardise(y) if standardise else y
    res = compute_stats(z, cfg, scheduler="sync")
    if matrices is not None:
        matrices[name] = (res["corr_z"], res["corr_sq"])
    s = summarise(res, [], cfg)
    ind, nm = s["independence"], s["normality"]
    amari = None
    if sources is not None and sources.shape[1] == y.shape[1]:
        amari = amari_distance(mixing_to_sources(y, sources))
    return {"representation": name, "n": int(len(y)), "standardised": standardise,
            "max_abs_corr": ind["max_abs_offdiag_corr"], "corr_threshold": ind["corr_threshold"],
            "max_abs_corr_of_squares": ind["max_abs_offdiag_corr_of_squares"],
            "mean_abs_excess_kurtosis": nm["mean_abs_excess_kurtosis"],
            "kurtosis_threshold": nm["kurtosis_threshold"], "n_dims_not_normal": nm["n_dims_failing"],
            "dependence_tests_rejecting": independence_failures(ind), "amari_distance": amari,
            "combined_p": ind["p"], "total_dependence": total_dependence(y, cfg.seed, cfg.alpha) if dependence else None}


def ica_table(x: np.ndarray, latents: np.ndarray, sources: np.ndarray | None, cfg: StatsConfig,
              matrices: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Rows raw data / FastICA(data) / PF-ODE latents / randomly rotated latents, on the same rows
    (``matrices``: see ``representation_row``)."""
    x = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    x = x[:, x.std(0) > 1e-12]  # constant dims (e.g. always-blank pixels) carry nothing
    z = np.asarray(latents, dtype=np.float64).reshape(len(latents), -1)
    rot = ortho_group.rvs(z.shape[1], random_state=cfg.seed) if z.shape[1] > 1 else np.ones((1, 1))
    reps = [("raw data", x, True, True), ("FastICA(data)", fit_ica(x, cfg.seed), False, True),
            ("PF-ODE latents", z, False, True), ("PF-ODE latents, randomly rotated", z @ rot, False, False)]
    rows = [representation_row(name, y, sources, cfg, std, dep, matrices) for name, y, std, dep in reps]
    lat = rows[2]  # the same rows and half-samples: a paired interval for the difference
    lat["total_dependence_difference_vs"] = {
        r["representation"]: difference_ci(lat["total_dependence"], r["total_dependence"], cfg.alpha) for r in rows[:2]}
    return rows
