"""Calibration of the three answers: false-alarm rates on exact nulls and power on planted effects.

Runs the statistics functions directly (no extraction, no Prefect), as ``analyze`` does after its
passes, and counts how often each answer's verdict comes out "no" (the false alarm) on data for
which the truth is "yes":

- independence: (a) N(0, I) latents; (b) latents of Gaussian data N(mu, Sigma) under the exact
  PF-ODE map (closed form, VP SDE), tested in p_T-standardised coordinates as ``analyze`` does;
  (c) independent Laplace coordinates (non-Gaussian marginals, still independent);
- realism: decodes that are true samples of the model's law (a 3-component Gaussian mixture in 4-D)
  against held-out samples of the same law (MMD + classifier test, Bonferroni);
- bijection: full-rank Gaussian data with the exact map (the round trip is exact): the rank rule and
  the degenerate-direction variance test.

Each at two sample sizes, ``--runs`` seeds (default 200); the false-alarm rate is given with its
Clopper-Pearson 95 % interval. Power curves (``--power-runs`` seeds per point) on planted dependence:
one linearly correlated pair (rho = 0.05, and rho at the stated minimum detectable correlation of
each N), z2 = z1^2 + noise (corr(z2, z1^2) = 0.1), a random rotation of 4 Laplace sources, and for
realism decodes whose spread is 1.15x the data's.

Usage::

    nice -n 10 .venv/bin/python -m benchmarks calibration --jobs 2        # 2 worker processes
    nice -n 10 .venv/bin/python -m benchmarks calibration --runs 40 --power-runs 10   # smoke run

Markdown tables to stdout, progress to stderr; every rate and interval in the run's JSON record.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # one BLAS thread per worker process: --jobs sets the parallelism

import numpy as np  # noqa: E402
from scipy import stats  # noqa: E402

from pflatents.tasks.analysis.answers import _bijection, _realism, answers
from pflatents.tasks.analysis.decision import INDEPENDENCE_FAMILIES, clopper_pearson, pair_corr_mde
from pflatents.tasks.analysis.prior import prior_target
from pflatents.tasks.analysis.realism import realism
from pflatents.tasks.analysis.reconstruct import exact_gaussian_latents
from pflatents.tasks.analysis.spectrum import data_spectrum, latent_spectrum
from pflatents.tasks.analysis.stats import StatsConfig, compute_stats
from pflatents.tasks.analysis.summary import summarise
from pflatents.tasks.ode.sde import VPSDE

ALPHA = 0.05
D = 8


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def independence_kind(x: np.ndarray, cfg: StatsConfig) -> tuple[str, float]:
    """The independence answer's kind and combined p on rows x (tested as they are)."""
    s = summarise(compute_stats(x, cfg, scheduler="sync"), [], cfg)
    s.update(alpha=cfg.alpha, prior={"skipped": "-"})
    a = answers(s)["independence"]
    return a["kind"], a["deciding"]["value"]


def gaussian_case(n: int, seed: int, d: int = 6) -> tuple[dict, np.ndarray]:
    """Gaussian data N(mu, Sigma) with exact PF-ODE latents; the summary blocks the bijection answer
    reads, and the latents in the tested (p_T-standardised) coordinates."""
    rng = np.random.default_rng([seed, 31])
    u = stats.ortho_group.rvs(d, random_state=1000 + seed)
    lam = np.geomspace(2.0, 0.01, d)
    cov, mu = (u * lam) @ u.T, rng.normal(size=d)
    x = rng.multivariate_normal(mu, cov, size=n)
    sde = VPSDE()
    z = exact_gaussian_latents(x, mu, cov, sde, 1e-5) / float(sde.prior_std)
    spec = data_spectrum(n, x.mean(0), np.cov(x.T))
    target = prior_target(spec, sde, ALPHA)
    sp = latent_spectrum(spec, z.mean(0), np.cov(z.T), target.degenerate_var)
    return {"n_samples": n, "n_dims": d, "alpha": ALPHA, "data": sp["data"], "latent": sp["latent"],
            "reconstruction": {"max_abs_error": 0.0}}, target.apply(z)


def gmm_sample(n: int, rng: np.random.Generator) -> np.ndarray:
    """A fixed 3-component Gaussian mixture in 4-D."""
    means = np.array([[0, 0, 0, 0], [2.5, 0, -1, 0.5], [-1, 2, 1, -1.5]], float)
    k = rng.choice(3, n, p=[0.5, 0.3, 0.2])
    return means[k] + rng.normal(size=(n, 4)) * np.array([1.0, 0.6, 0.8, 0.5])[k][:, None]


def _realism_only(p: dict, m: int) -> str:
    """The realism answer's kind for the realism block ``p`` of M decodes."""
    return _realism({"alpha": ALPHA, "prior": {"m": m, "compared_with": "held-out samples", **p}})["kind"]


def rate(kinds: list[str], bad: str = "no") -> dict:
    k, n = sum(x == bad for x in kinds), len(kinds)
    lo, hi = clopper_pearson(k, n, 0.95)
    return {"count": k, "runs": n, "rate": k / n, "ci": [lo, hi],
            "kinds": {v: kinds.count(v) for v in sorted(set(kinds))}}


NULLS = {
    "independence: N(0, I) latents, D = 8": "independence",
    "independence: exact latents of N(mu, Sigma) data, p_T coordinates, D = 6": "independence",
    "independence: independent Laplace coordinates, D = 8": "independence",
    "realism: decodes are true samples of a 4-D GMM (M decodes vs M held-out)": "realism",
    "bijection: full-rank N(mu, Sigma) data, exact map, D = 6": "bijection",
}


def null_kind(case: str, n: int, seed: int) -> str:
    """The verdict's kind on one seeded exact null."""
    cfg = StatsConfig(alpha=ALPHA)
    if case.startswith("independence: N(0, I)"):
        return independence_kind(np.random.default_rng([seed, 1]).normal(size=(n, D)), cfg)[0]
    if case.startswith("independence: exact latents"):
        return independence_kind(gaussian_case(n, seed)[1], cfg)[0]
    if case.startswith("independence: independent Laplace"):
        return independence_kind(np.random.default_rng([seed, 2]).laplace(size=(n, D)) / np.sqrt(2), cfg)[0]
    if case.startswith("realism"):
        return _realism_only(_realism_p(n, seed), n)
    return _bijection(gaussian_case(n, seed)[0])["kind"]


_POOL = None


def _pool_map(f, args: list[tuple], jobs: int) -> list:
    """``f`` over ``args`` in ``jobs`` worker processes (started once, reused)."""
    global _POOL
    if jobs <= 1:
        return [f(*a) for a in args]
    if _POOL is None:
        from concurrent.futures import ProcessPoolExecutor

        _POOL = ProcessPoolExecutor(jobs)
    return list(_POOL.map(f, *zip(*args), chunksize=max(1, len(args) // (4 * jobs))))


def null_runs(runs: int, sizes: dict[str, list[int]], jobs: int) -> list[dict]:
    out = []
    for name, key in NULLS.items():
        for n in sizes.get(key, []):
            t0 = time.perf_counter()
            kinds = _pool_map(null_kind, [(name, n, s) for s in range(runs)], jobs)
            r = {"case": name, "n": n, **rate(kinds), "seconds": time.perf_counter() - t0}
            log(f"  {name}, N = {n}: {r['count']}/{runs} false alarms ({time.perf_counter() - t0:.0f} s)")
            out.append(r)
    return out


def _realism_p(m: int, seed: int, spread: float = 1.0) -> dict:
    rng = np.random.default_rng([seed, 41])
    dec, held, train = gmm_sample(m, rng), gmm_sample(m, rng), gmm_sample(2000, rng)
    dec = dec.mean(0) + spread * (dec - dec.mean(0))
    return realism(dec, held, train, None, seed, ALPHA)


def planted(case: str, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng([seed, 51])
    x = rng.normal(size=(n, D))
    if case.startswith("linear"):
        rho = float(case.split("=")[1]) if "rho=" in case else pair_corr_mde(n, D * (D - 1) // 2, ALPHA / len(INDEPENDENCE_FAMILIES))
        x[:, 1] = rho * x[:, 0] + np.sqrt(1 - rho ** 2) * x[:, 1]
    elif case.startswith("nonlinear"):
        c = 0.1 / np.sqrt(2 * (1 - 0.01))  # corr(z2, z1^2) = 0.1, z2 uncorrelated with z1
        x[:, 1] = c * (x[:, 0] ** 2 - 1) + np.sqrt(1 - 2 * c * c) * x[:, 1]
    elif case.startswith("rotated Laplace"):
        s = rng.laplace(size=(n, 4)) / np.sqrt(2)
        return s @ stats.ortho_group.rvs(4, random_state=seed)
    return x


def power_kind(case: str, n: int, seed: int) -> str:
    """The verdict's kind on one seeded planted effect."""
    if case.startswith("realism"):
        return _realism_only(_realism_p(n, seed, 1.15), n)
    return independence_kind(planted(case, n, seed), StatsConfig(alpha=ALPHA))[0]


def power_runs(runs: int, ns: list[int], ms: list[int], jobs: int) -> list[dict]:
    out = []
    cases = [(c, ns) for c in ("linear rho=0.05", "linear, rho = the stated minimum detectable |r|",
                               "nonlinear z2 ~ z1^2 (corr 0.1)", "rotated Laplace sources, D = 4")]
    for case, sizes in cases + [("realism: decodes 1.15x as spread as the data", ms)]:
        for n in sizes:
            t0 = time.perf_counter()
            kinds = _pool_map(power_kind, [(case, n, s) for s in range(runs)], jobs)
            name = case if case.startswith("realism") else "independence: " + case
            r = {"case": name, "n": n, **rate(kinds), "seconds": time.perf_counter() - t0}
            if "stated" in case:
                r["rho"] = pair_corr_mde(n, D * (D - 1) // 2, ALPHA / len(INDEPENDENCE_FAMILIES))
            log(f"  {case}, N = {n}: power {r['rate']:.2f} ({time.perf_counter() - t0:.0f} s)")
            out.append(r)
    return out


def table(rows: list[dict], what: str) -> str:
    lines = [f"| case | N | {what} | 95 % CI (Clopper-Pearson) | runs | verdicts |", "|---|---|---|---|---|---|"]
    for r in rows:
        extra = f" (rho {r['rho']:.3f})" if "rho" in r else ""
        lines.append(f"| {r['case']}{extra} | {r['n']} | {r['rate']:.3f} | {r['ci'][0]:.3f} - {r['ci'][1]:.3f} | "
                     f"{r['runs']} | {', '.join(f'{k} {v}' for k, v in r['kinds'].items())} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks calibration", description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=200, help="null runs per case and size")
    ap.add_argument("--power-runs", type=int, default=50, help="runs per power point")
    ap.add_argument("--jobs", type=int, default=2, help="worker processes (one BLAS thread each)")
    ap.add_argument("--only", nargs="+", choices=["independence", "realism", "bijection"],
                    default=["independence", "realism", "bijection"], help="the questions to run")
    a = ap.parse_args(argv)
    sizes = {k: v for k, v in {"independence": [2000, 20000], "realism": [100, 300],
                               "bijection": [2000, 20000]}.items() if k in a.only}
    t0 = time.perf_counter()
    log("null runs")
    nulls = null_runs(a.runs, sizes, a.jobs)
    log("power runs")
    power = power_runs(a.power_runs, [500, 2000, 8000, 32000] if "independence" in a.only else [],
                       [100, 300] if "realism" in a.only else [], a.jobs)
    print(f"False alarms at alpha = {ALPHA} (verdict 'no' on an exact null)\n")
    print(table(nulls, "false-alarm rate"))
    print("\nPower (verdict 'no' on planted dependence / a planted difference)\n")
    print(table(power, "power"))
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    if _POOL is not None:
        _POOL.shutdown()
    return {"alpha": ALPHA, "nulls": nulls, "power": power}

