"""One decision per question at a stated level: combined p-values, effect sizes with confidence
intervals, and the minimum detectable effect (80 % power) from the same null distributions.

- Independence: five test families (linear correlation, Bartlett, correlation of |z|, HSIC, binned
  MI), each with a Bonferroni p-value over its pairs; the verdict rejects when the smallest family
  p-value times the number of families is below ``alpha`` (Bonferroni across families; Holm gives
  the same verdict, its first step is Bonferroni). Two statistics are reported but left out of the
  verdict: the correlation of squares (products of centred squares are so heavy-tailed that the
  normal null of sqrt(N) r is far too thin at the Bonferroni levels, ~1e-4: 6 of 150 Gaussian runs
  at N = 2000 rejected at 0.05/6, against 1.25 expected), and distance correlation (its pairs are
  chosen by the other tests on the same rows, and its permutation p-value cannot go below
  1 / (1 + permutations)).
- Realism: MMD and the classifier test, Bonferroni over the two.
- Bijection: a data direction below the resolution floor, and the latents' variance along it
  tested against the prior's (chi-square, Bonferroni over the degenerate directions).

Effects: the Gaussian total correlation with a confidence interval from the noncentral chi-square
law of Bartlett's statistic; the classifier's accuracy with a Clopper-Pearson interval; the latent
variance ratio with a chi-square interval. Minimum detectable effects solve "rejected with
probability ``POWER``" under the same laws. Pure scipy.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy import optimize, stats

__all__ = ["POWER", "INDEPENDENCE_FAMILIES", "family_pvalues", "combined_p", "bartlett_dof",
           "noncentrality_ci", "bartlett_mde", "pair_corr_mde", "gaussian_mi", "clopper_pearson",
           "c2st_mde", "variance_ratio_ci", "variance_ratio_p", "variance_ratio_mde", "MAX_PAIR_MDE"]

POWER = 0.8
INDEPENDENCE_FAMILIES = ("linear correlation", "Bartlett", "correlation of |z|", "HSIC", "binned MI")
MAX_PAIR_MDE = 0.5  # a pairwise correlation this strong would go unseen more than 1 time in 5: "cannot tell"


def _pair_p(r: float, n: int, m: int) -> float:
    """Bonferroni p of the largest |r| of m pairs: m * 2 Phi(-sqrt(N) |r|)."""
    if m == 0:
        return 1.0
    return float(min(1.0, m * 2 * stats.norm.sf(math.sqrt(n) * abs(r))))


def family_pvalues(ind: dict[str, Any], n: int, d: int) -> dict[str, float]:
    """Each independence family's p-value, Bonferroni over its pairs (``ind`` from ``summarise``)."""
    m = d * (d - 1) // 2
    k = ind.get("pair_test_dims", d)
    mk = k * (k - 1) // 2
    return {"linear correlation": _pair_p(ind["max_abs_offdiag_corr"], n, m),
            "Bartlett": float(ind["bartlett_p"]),
            "correlation of |z|": _pair_p(ind["max_abs_offdiag_corr_of_abs"], n, m),
            "HSIC": float(min(1.0, mk * ind["hsic_min_p"])) if mk else 1.0,
            "binned MI": float(min(1.0, mk * ind["mi_min_p"])) if mk else 1.0}


def combined_p(ps: list[float | None]) -> float:
    """Bonferroni across families: min(1, K * min p) over the p-values given (None: not run)."""
    ps = [p for p in ps if p is not None]
    return float(min(1.0, len(ps) * min(ps))) if ps else 1.0


def bartlett_dof(n: int, d: int) -> float:
    """Bartlett's multiplier n' = N - 1 - (2D + 5)/6: the statistic is 2 n' times the Gaussian TC."""
    return n - 1 - (2 * d + 5) / 6


def noncentrality_ci(stat: float, dof: int, level: float) -> tuple[float, float]:
    """Confidence interval (coverage ``level``) for the noncentrality of a noncentral chi-square
    from one observation ``stat`` (inverted tail probabilities; 0 where the central law fits)."""
    a = (1 - level) / 2
    if dof <= 0 or not np.isfinite(stat):
        return (0.0, float("inf")) if not np.isfinite(stat) else (0.0, 0.0)

    def root(target_sf: float) -> float:
        f = lambda lam: stats.ncx2.sf(stat, dof, lam) - target_sf if lam > 0 else stats.chi2.sf(stat, dof) - target_sf  # noqa: E731
        if f(0.0) >= 0:
            return 0.0
        hi = max(1.0, stat)
        while f(hi) < 0:
            hi *= 2
        return float(optimize.brentq(f, 0.0, hi, xtol=1e-10 * max(1.0, hi)))

    return root(a), root(1 - a)


def bartlett_mde(n: int, d: int, level: float, power: float = POWER) -> float | None:
    """Gaussian total correlation (nats) that Bartlett's test at ``level`` detects with ``power``."""
    m, n1 = d * (d - 1) // 2, bartlett_dof(n, d)
    if m == 0 or n1 <= 0:
        return None
    crit = stats.chi2.isf(level, m)
    f = lambda lam: stats.ncx2.sf(crit, m, lam) - power  # noqa: E731
    hi = 1.0
    while f(hi) < 0:
        hi *= 2
    return float(optimize.brentq(f, 1e-12, hi, xtol=1e-10 * hi)) / (2 * n1)


def pair_corr_mde(n: int, m: int, level: float, power: float = POWER) -> float | None:
    """|r| of one pair that the Bonferroni pair test (m pairs, ``level``) detects with ``power``."""
    if m == 0 or n < 2:
        return None
    return float(min(1.0, (stats.norm.isf(level / (2 * m)) + stats.norm.ppf(power)) / math.sqrt(n)))


def gaussian_mi(r: float | None) -> float | None:
    """Mutual information (nats) of a bivariate Gaussian with correlation r: -1/2 log(1 - r^2)."""
    if r is None:
        return None
    return float(-0.5 * math.log1p(-min(r * r, 1 - 1e-16)))


def clopper_pearson(k: int, n: int, level: float) -> tuple[float, float]:
    """Exact binomial confidence interval for k successes of n."""
    a = (1 - level) / 2
    lo = 0.0 if k <= 0 else float(stats.beta.ppf(a, k, n - k + 1))
    hi = 1.0 if k >= n else float(stats.beta.ppf(1 - a, k + 1, n - k))
    return lo, hi


def c2st_mde(n: int, level: float, power: float = POWER) -> float | None:
    """Classifier accuracy detected with ``power`` when the binomial test's own level is ``level``."""
    if n < 1:
        return None
    k = int(stats.binom.isf(level, n, 0.5)) + 1  # smallest k with P(X >= k | 1/2) <= level
    while k > 0 and stats.binom.sf(k - 2, n, 0.5) <= level:
        k -= 1
    if k > n:
        return None
    f = lambda a: stats.binom.sf(k - 1, n, a) - power  # noqa: E731
    return float(optimize.brentq(f, 0.5, 1.0 - 1e-12)) if f(1.0 - 1e-12) > 0 else None


def variance_ratio_ci(ratio: float, n: int, level: float) -> tuple[float, float]:
    """Chi-square interval for a variance ratio estimated from n Gaussian rows (ddof 1)."""
    a = (1 - level) / 2
    return float(ratio * (n - 1) / stats.chi2.isf(a, n - 1)), float(ratio * (n - 1) / stats.chi2.ppf(a, n - 1))


def variance_ratio_p(ratio: float, n: int) -> float:
    """Two-sided chi-square p-value of H0: variance ratio 1 (n rows, ddof 1)."""
    x = ratio * (n - 1)
    return float(min(1.0, 2 * min(stats.chi2.cdf(x, n - 1), stats.chi2.sf(x, n - 1))))


def variance_ratio_mde(n: int, level: float, power: float = POWER) -> float | None:
    """The smallest variance shrink factor r < 1 the two-sided test at ``level`` detects with ``power``:
    the latents' variance along a direction at r times the prior's or less is seen."""
    if n < 2:
        return None
    lo = stats.chi2.ppf(level / 2, n - 1)
    return float(lo / stats.chi2.ppf(power, n - 1))
