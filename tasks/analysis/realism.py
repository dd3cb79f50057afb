"""Question 1: do decodes of fresh prior draws look like the data? Two-sample tests and memorisation.

- Kernel two-sample test: the unbiased MMD^2 with an RBF kernel whose bandwidth is the median
  pairwise distance of the pooled sample, and a permutation p-value (1 + #{perm >= obs}) / (1 + P).
- Classifier two-sample test (C2ST): a k-nearest-neighbour classifier (k ~ sqrt of the training
  half) and a regularised QDA (features standardised) are fitted on a seeded stratified half of the
  rows to separate decodes from data and scored on the other half; the better held-out accuracy is
  reported, 0.5 when they are indistinguishable; under that null the number of correct held-out
  predictions is at most as spread as Binomial(n_test, 1/2), which gives the p-value (times 2 for
  the two classifiers; cross-validated counts are over-dispersed and made it liberal). When the
  training half holds no more samples of a class than
  there are dimensions (a few prior draws of an image), a class covariance is singular and cannot be
  estimated; QDA then models each class by its mean and one variance (a spherical covariance, the
  eigen solver's shrinkage 1), which still sees a sample more spread out than the other. A
  classifier that cannot be fitted is left out and named; with fewer than 3 samples on a side the
  test is not run (``c2st_accuracy`` None, the reason in ``c2st_classifier``).
- Memorisation: the median distance from each decode to its nearest training sample over the median
  distance from held-out data to its nearest training sample. Near 1: decodes are as far from the
  training set as new data; well below 1: the model reproduces training samples.

Quantised data (a grid of q levels on [-1, 1]) are compared after rounding the decodes to the same
grid, so that the tests see the samples a user would keep, not the grid. The decodes count as told
apart when the two tests, Bonferroni-combined (``p`` = 2 x the smaller p-value), reject at ``alpha``.
A class-conditional model decodes each draw under a class label (``prior_labels``): drawn, seeded,
from the labels of the rows the decodes are compared with (so the decodes' class mix is the data's), or
the pinned ``--class-label K`` for every draw (the class every latent was encoded under).
Pure numpy / scikit-learn.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
from scipy import stats

from pflatents.tasks.analysis.decision import combined_p

__all__ = ["requantise", "mmd_test", "c2st", "nn_distance_ratio", "realism", "prior_labels"]

MIN_C2ST = 3  # samples per side: below, a training fold holds a single sample of a class (no covariance)


def requantise(x: np.ndarray, levels: int | None) -> np.ndarray:
    """Round to the grid -1 + 2k/(levels-1) (clipped); unchanged when ``levels`` is None."""
    x = np.asarray(x, dtype=np.float64)
    if levels is None:
        return x
    k = np.clip(np.rint((x + 1.0) * (levels - 1) / 2.0), 0, levels - 1)
    return -1.0 + 2.0 * k / (levels - 1)


def _sq_dists(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances (clipped at 0)."""
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return np.maximum(d, 0.0)


def mmd_test(x: np.ndarray, y: np.ndarray, permutations: int = 200, seed: int = 0) -> dict[str, Any]:
    """Unbiased MMD^2 (RBF, median bandwidth) of samples x, y and its permutation p-value."""
    x = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    y = np.asarray(y, dtype=np.float64).reshape(len(y), -1)
    z = np.concatenate([x, y])
    d2 = _sq_dists(z, z)
    iu = np.triu_indices(len(z), 1)
    med = float(np.median(d2[iu]))
    bw2 = med if med > 0 else 1.0
    k = np.exp(-d2 / bw2)
    np.fill_diagonal(k, 0.0)
    n, m = len(x), len(y)

    def stat(lab: np.ndarray) -> float:
        a, b = lab, ~lab
        kxx, kyy, kxy = k[np.ix_(a, a)].sum(), k[np.ix_(b, b)].sum(), k[np.ix_(a, b)].sum()
        return kxx / (n * (n - 1)) + kyy / (m * (m - 1)) - 2 * kxy / (n * m)

    lab = np.zeros(len(z), bool)
    lab[:n] = True
    obs = stat(lab)
    rng = np.random.default_rng([seed, 11])
    hits = sum(stat(rng.permutation(lab)) >= obs for _ in range(permutations))
    return {"mmd": float(obs), "mmd_p": (1 + hits) / (1 + permutations), "bandwidth": math.sqrt(bw2),
            "permutations": permutations}


def c2st(x: np.ndarray, y: np.ndarray, seed: int = 0) -> dict[str, Any]:
    """Held-out accuracy (fitted on a seeded stratified half, scored on the other) of two classifiers
    separating x from y -- k nearest neighbours (local structure) and regularised quadratic
    discriminant analysis (means and covariances, where kNN is weak: a sample more spread out than the
    other) -- the better one, with a binomial p-value Bonferroni-corrected for the two."""
    from sklearn.discriminant_analysis import QuadraticDiscriminantAnalysis
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    y = np.asarray(y, dtype=np.float64).reshape(len(y), -1)
    n_min = min(len(x), len(y))
    if n_min < MIN_C2ST:
        return {"c2st_accuracy": None, "c2st_p": None,
                "c2st_classifier": f"not run: {len(x)} decodes and {len(y)} data rows; the classifier test needs "
                                   f"at least {MIN_C2ST} of each (more --prior draws)"}
    z, lab = np.concatenate([x, y]), np.r_[np.zeros(len(x), int), np.ones(len(y), int)]
    # fit on a seeded stratified half, score the other half: the held-out predictions are independent
    # given the fitted classifier, so the number correct is at most as spread as Binomial(n_test, 1/2)
    # under the null (cross-validated predictions are not: their count is over-dispersed, and the
    # binomial p-value was liberal, 8.5 % false alarms at a nominal 5 % with 300 draws)
    rng = np.random.default_rng([seed, 14])
    test = np.zeros(len(z), bool)
    for c in (0, 1):
        idx = np.flatnonzero(lab == c)
        test[rng.choice(idx, len(idx) // 2, replace=False)] = True
    n_train_min = min(int((~test & (lab == c)).sum()) for c in (0, 1))
    k = max(1, int(round(math.sqrt((~test).sum()))) | 1)
    # the smallest class of the training half: with no more samples than dimensions its covariance is
    # singular (the SVD solver refuses it, and a light shrinkage leaves a tiny variance off the
    # samples' span that misclassifies everything): mean and one variance per class instead
    small = n_train_min <= z.shape[1]
    classifiers = {f"{k}-nearest neighbours": KNeighborsClassifier(n_neighbors=min(k, int((~test).sum())))}
    if small:
        classifiers["QDA, one variance per class (fewer samples than dimensions)"] = QuadraticDiscriminantAnalysis(
            solver="eigen", shrinkage=1.0)
    else:
        classifiers["regularised QDA"] = QuadraticDiscriminantAnalysis(reg_param=0.1)
    acc, failed = {}, []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # collinear features in QDA: the regularisation handles them
        for name, clf in classifiers.items():
            try:
                pred = make_pipeline(StandardScaler(), clf).fit(z[~test], lab[~test]).predict(z[test])
            except (np.linalg.LinAlgError, ValueError) as e:
                failed.append(f"{name} could not be fitted ({str(e).splitlines()[0][:120]})")
                continue
            acc[name] = int((pred == lab[test]).sum())
    if not acc:
        return {"c2st_accuracy": None, "c2st_p": None, "c2st_classifier": "not run: " + "; ".join(failed)}
    best, n_test = max(acc, key=acc.get), int(test.sum())
    p = min(1.0, len(classifiers) * float(stats.binom.sf(acc[best] - 1, n_test, 0.5)))
    return {"c2st_accuracy": acc[best] / n_test, "c2st_p": p, "c2st_n": n_test,
            "c2st_n_classifiers": len(classifiers),
            "c2st_classifier": f"{best} (fitted on half the rows, scored on the other {n_test}; best of: " +
            ", ".join(f"{n} {a / n_test:.3f}" for n, a in acc.items()) + ")" + "".join(f"; {f}" for f in failed)}


def _nn_dist(query: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Distance from each query row to its nearest reference row."""
    from sklearn.neighbors import NearestNeighbors

    return NearestNeighbors(n_neighbors=1).fit(ref).kneighbors(query)[0][:, 0]


def nn_distance_ratio(decodes: np.ndarray, heldout: np.ndarray, train: np.ndarray) -> dict[str, Any]:
    """Median nearest-training-sample distance of decodes over that of held-out data."""
    f = lambda a: np.asarray(a, dtype=np.float64).reshape(len(a), -1)  # noqa: E731
    gen, held = _nn_dist(f(decodes), f(train)), _nn_dist(f(heldout), f(train))
    hm = float(np.median(held))
    return {"nn_distance_ratio": float(np.median(gen)) / hm if hm > 0 else None,
            "nn_distance_decodes_median": float(np.median(gen)), "nn_distance_heldout_median": hm,
            "fraction_decodes_closer_than_heldout_p1": float((gen < np.quantile(held, 0.01)).mean())}


def realism(decodes: np.ndarray, heldout: np.ndarray, train: np.ndarray, quantization: int | None,
            seed: int = 0, alpha: float = 0.05) -> dict[str, Any]:
    """The ``prior`` block: MMD, C2ST and the nearest-neighbour ratio of decodes vs data."""
    dec = requantise(decodes, quantization)
    out: dict[str, Any] = {"n_decodes": int(len(dec)), "n_heldout": int(len(heldout)), "n_train_reference": int(len(train)),
                           "requantised": quantization is not None}
    if len(dec) < 2 or len(heldout) < 2:
        out["skipped"] = (f"{len(dec)} decodes (without solver failures) and {len(heldout)} data rows: the two-sample "
                          "tests need at least 2 of each (more --prior draws)")
        return out
    out.update(mmd_test(dec, heldout, seed=seed))
    out.update(c2st(dec, heldout, seed=seed))
    out.update(nn_distance_ratio(dec, heldout, train))
    # one decision at ``alpha``: Bonferroni over the two tests (each valid on its own)
    out["p"] = combined_p([out["mmd_p"], out["c2st_p"]])
    out["level"] = alpha
    out["distinguishable"] = bool(out["p"] < alpha)
    return out


def prior_labels(labels: np.ndarray | None, m: int, seed: int, class_label: int | None = None
                 ) -> tuple[np.ndarray | None, str]:
    """Class labels (int64, (m,)) for ``m`` prior draws of a class-conditional model and what they are:
    ``class_label`` for every draw when one is pinned, else drawn with replacement (seeded) from
    ``labels``, the labels of the rows the decodes are compared with (unknown ones, -1, left out), so
    each class is decoded as often as it occurs there. (None, why) when there is no label to draw."""
    if class_label is not None:
        return np.full(m, int(class_label), dtype=np.int64), f"class {int(class_label)} (--class-label)"
    known = np.asarray([] if labels is None else labels, dtype=np.int64)
    known = known[known >= 0]
    if not len(known):
        return None, "the model is class-conditional but the rows compared with have no labels to draw from"
    drawn = np.random.default_rng([seed, 15]).choice(known, m, replace=True)
    return drawn.astype(np.int64), "labels drawn from the data's class frequencies"
