"""The plain-JSON summary of the statistics, the list of rejecting tests, and a one-line verdict.

Pure numpy / scipy.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy import stats

from pflatents.tasks.analysis.decision import (INDEPENDENCE_FAMILIES, POWER, bartlett_dof, bartlett_mde, combined_p,
                                               family_pvalues, gaussian_mi, noncentrality_ci, pair_corr_mde)
from pflatents.tasks.analysis.dependence import pair_threshold, total_correlation
from pflatents.tasks.analysis.normality import TESTS, per_test_level

if TYPE_CHECKING:
    from pflatents.tasks.analysis.stats import StatsConfig

__all__ = ["summarise", "decision_figures", "independence_failures", "verdict"]


def _offdiag_max(r: np.ndarray) -> float:
    """Largest |off-diagonal| entry (0 for one dim)."""
    if len(r) < 2:
        return 0.0
    return float(np.abs(r[~np.eye(len(r), dtype=bool)]).max())


def _n_over(r: np.ndarray, thr: float) -> int:
    """Number of pairs i < j with |r_ij| > thr."""
    return int((np.abs(r[np.triu_indices(len(r), 1)]) > thr).sum())


def _n_rejected(p: np.ndarray, alpha: float) -> tuple[int, float]:
    """Pairs i < j with p < alpha / m, and the smallest p."""
    iu = np.triu_indices(len(p), 1)
    m = len(iu[0])
    if m == 0:
        return 0, 1.0
    return int((p[iu] < alpha / m).sum()), float(p[iu].min())


def summarise(res: dict[str, Any], dcor: list[dict[str, Any]], cfg: StatsConfig,
              labels: np.ndarray | None = None) -> dict[str, Any]:
    """Plain-JSON summary: normality and independence figures, thresholds and failing dims/pairs.

    The independence families are each tested at ``alpha / K`` (K = 5 families, Bonferroni across
    them), so their pass lines and counts agree with the one verdict at level ``alpha``:
    ``independence["p"]`` (the combined p-value), ``["rejected"]``, the Gaussian total correlation's
    estimate and confidence interval, and the minimum detectable effects (``decision.py``).

    ``labels`` names the latent dim of each tested coordinate (when the coordinates are not the
    latent dims themselves); failing dims and dCor pairs are reported with these labels."""
    n, d, a = res["n"], res["d"], cfg.alpha
    af = a / len(INDEPENDENCE_FAMILIES)  # each family's level: Bonferroni across the families
    lab = np.arange(d) if labels is None else np.asarray(labels)
    dcor = [{**t, "pair": [int(lab[t["pair"][0]]), int(lab[t["pair"][1]])]} for t in dcor]
    nm = res["normality"]
    m = d * (d - 1) // 2
    thr = pair_threshold(n, m, af)
    fail = np.flatnonzero(nm["fail"])
    normality = {
        "max_abs_mean": float(np.abs(nm["mean"]).max()), "max_abs_var_minus_1": float(np.abs(nm["var"] - 1).max()),
        "mean_abs_skew": float(np.nanmean(np.abs(nm["skew"]))),
        "mean_abs_excess_kurtosis": float(np.nanmean(np.abs(nm["kurt"]))),
        "n_constant_dims": int((nm["var"] <= 0).sum()),
        "kurtosis_threshold": float(stats.norm.isf(a / 2) * math.sqrt(24 / n)),
        "max_ks": float(nm["ks"].max()), "ks_threshold_5pct": 1.358 / math.sqrt(n),
        "max_ad": float(nm["ad"].max()), "ad_threshold_5pct": 2.492,
        "n_dims_failing": int(len(fail)), "failing_dims": lab[fail[:50]].tolist(),
        "per_test_level": per_test_level(a, d),
        "n_dims_failing_by_test": {t[2:]: int((nm[t] < per_test_level(a, d)).sum()) for t in TESTS}}
    hsic_n, hsic_p = _n_rejected(res["hsic_p"], af)
    mi_n, mi_p = _n_rejected(res["mi_p"], af)
    independence = {
        "max_abs_offdiag_corr": _offdiag_max(res["corr_z"]), "corr_threshold": thr,
        "n_pairs_over_threshold": _n_over(res["corr_z"], thr),
        **total_correlation(res["corr_z"], n, af),
        "max_abs_offdiag_corr_of_squares": _offdiag_max(res["corr_sq"]),
        "n_pairs_over_threshold_squares": _n_over(res["corr_sq"], thr),
        "max_abs_offdiag_corr_of_abs": _offdiag_max(res["corr_abs"]),
        "n_pairs_over_threshold_abs": _n_over(res["corr_abs"], thr),
        "pair_test_dims": len(res["pair_dims"]),
        "hsic_n_pairs_rejected": hsic_n, "hsic_min_p": hsic_p,
        "max_binned_mi": _offdiag_max(res["mi"]), "mi_n_pairs_rejected": mi_n, "mi_min_p": mi_p,
        "dcor_pairs_tested": len(dcor), "dcor_n_rejected": int(sum(t["rejected"] for t in dcor)),
        "dcor_tests": dcor}
    independence.update(decision_figures(independence, n, d, a))
    return {"n_samples": int(n), "n_dims": int(d), "alpha": a, "normality": normality,
            "independence": independence}


def decision_figures(ind: dict[str, Any], n: int, d: int, alpha: float) -> dict[str, Any]:
    """The one independence decision at ``alpha``: family p-values, the combined p, the Gaussian
    total correlation's bias-corrected estimate and (1 - alpha) interval (noncentral chi-square of
    Bartlett's statistic), and the minimum detectable effects at ``POWER``."""
    m = d * (d - 1) // 2
    af = alpha / len(INDEPENDENCE_FAMILIES)
    fam = family_pvalues(ind, n, d)
    p = combined_p(list(fam.values()))
    n1 = bartlett_dof(n, d)
    out: dict[str, Any] = {"level": alpha, "family_level": af, "family_p": fam, "p": p, "rejected": bool(p < alpha),
                           "power": POWER, "mde_pair_corr": pair_corr_mde(n, m, af)}
    out["mde_pair_mutual_information"] = gaussian_mi(out["mde_pair_corr"])
    if m and n1 > 0 and np.isfinite(ind["bartlett_stat"]):
        lo, hi = noncentrality_ci(ind["bartlett_stat"], m, 1 - alpha)
        out.update(gaussian_total_correlation_estimate=max(0.0, ind["bartlett_stat"] - m) / (2 * n1),
                   gaussian_total_correlation_ci=[lo / (2 * n1), hi / (2 * n1)],
                   mde_gaussian_total_correlation=bartlett_mde(n, d, af))
    else:
        out.update(gaussian_total_correlation_estimate=ind["gaussian_total_correlation"] if m else 0.0,
                   gaussian_total_correlation_ci=None, mde_gaussian_total_correlation=None)
    return out


def independence_failures(ind: dict[str, Any]) -> list[str]:
    """Names of the dependence families that reject, each at level alpha / 5 (Bonferroni over its pairs
    and across the five families): the verdict at level alpha is "dependent" exactly when one does.
    The correlation of squares and distance correlation are descriptive (``n_pairs_over_threshold_squares``,
    ``dcor_n_rejected``), not part of the verdict (``decision.py`` says why)."""
    checks = [("linear correlation", ind["n_pairs_over_threshold"]), ("Bartlett", ind["bartlett_rejected"]),
              ("correlation of |z|", ind["n_pairs_over_threshold_abs"]),
              ("HSIC", ind["hsic_n_pairs_rejected"]), ("binned MI", ind["mi_n_pairs_rejected"])]
    return [name for name, bad in checks if bad]


def verdict(summary: dict[str, Any]) -> str:
    """A short plain sentence on independence, normality and (when run) reconstruction."""
    bad = independence_failures(summary["independence"])
    nd, d = summary["normality"]["n_dims_failing"], summary["n_dims"]
    parts = [("dimensions look independent (no dependence test rejects)" if not bad
              else f"dimensions are dependent ({', '.join(bad)} reject)"),
             ("every dimension is consistent with N(0,1)" if nd == 0
              else f"{nd} of {d} dimensions are not N(0,1)")]
    rec = summary.get("reconstruction") or {}
    if rec.get("max_abs_error") is not None:
        parts.append(f"round-trip max abs error {rec['max_abs_error']:.2g}")
    text = "; ".join(parts)
    return text[0].upper() + text[1:] + "."
