"""Analytic test problems with exact (or independently computed) answers (closed forms in docs/math.md).

Everything here is plain numpy/scipy written from the formulas, independent of ``tasks``: the SDE
schedules are restated, the Gaussian flow map is the closed form, and the mixture reference
integrates the PF-ODE in plain t with ``scipy.integrate.solve_ivp``. Only parameters (beta_min,
sigma_max, ...) are read from the ``pflatents.tasks.ode.sde`` objects under test.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from scipy.integrate import solve_ivp
from scipy.special import logsumexp

from pflatents.tasks.models.scores import DenoiserScore, EpsScore, GaussianMixtureScore, VScore
from pflatents.tasks.ode.sde import EDMSDE, SDE, VESDE, VPSDE

Fn = Callable[[np.ndarray], np.ndarray]

# The test problems are tiny (B <= 512, D <= 4): with 2 OpenMP threads torch.softmax alone costs
# ~8 ms a call on a busy 2-core box (thread wake-ups), 1000x the work. tests/conftest.py runs every
# test of a module that imports from here on one torch thread and restores the count afterwards
# (setting it here, at import, leaked into every later test of the session).


# ---- schedules, restated from the formulas -----------------------------------------------------

@dataclass(frozen=True)
class Schedule:
    """x_t = alpha(t) x_0 + sigma(t) eps; PF-ODE dx/dt = f(t) x - 1/2 g2(t) score."""

    alpha: Fn
    sigma: Fn
    f: Fn
    g2: Fn


def schedule(sde: SDE) -> Schedule:
    """numpy re-statement of VP / VE / EDM schedules (docs/math.md, score_sde, EDM)."""
    if isinstance(sde, VPSDE):
        b0, b1 = sde.beta_min, sde.beta_max
        log_a = lambda t: -0.25 * t**2 * (b1 - b0) - 0.5 * t * b0  # noqa: E731
        return Schedule(alpha=lambda t: np.exp(log_a(t)),
                        sigma=lambda t: np.sqrt(-np.expm1(2 * log_a(t))),
                        f=lambda t: -0.5 * (b0 + t * (b1 - b0)),
                        g2=lambda t: b0 + t * (b1 - b0))
    if isinstance(sde, VESDE):
        lo, hi = sde.sigma_min, sde.sigma_max
        sig = lambda t: lo * (hi / lo) ** t  # noqa: E731
        return Schedule(alpha=np.ones_like, sigma=sig, f=np.zeros_like,
                        g2=lambda t: 2 * np.log(hi / lo) * sig(t) ** 2)
    if isinstance(sde, EDMSDE):
        return Schedule(alpha=np.ones_like, sigma=lambda t: np.asarray(t, dtype=float),
                        f=np.zeros_like, g2=lambda t: 2 * np.asarray(t, dtype=float))
    raise TypeError(f"no reference schedule for {sde!r}")


def _at(fn: Fn, t: float) -> float:
    return float(fn(np.asarray(t, dtype=np.float64)))


# ---- Gaussian data: the exact affine flow map ------------------------------------------------

def random_orthogonal(rng: np.random.Generator, d: int) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    return q * np.sign(np.diag(r))


def random_spd(rng: np.random.Generator, d: int, lam_lo: float = 0.2, lam_hi: float = 2.0) -> np.ndarray:
    """U diag(lam) U^T with log-uniform eigenvalues in [lam_lo, lam_hi] and a random rotation."""
    lam = np.exp(rng.uniform(np.log(lam_lo), np.log(lam_hi), d))
    u = random_orthogonal(rng, d)
    c = (u * lam) @ u.T
    return 0.5 * (c + c.T)


@dataclass(frozen=True)
class Gaussian:
    """Data N(mu, Sigma), Sigma = U diag(lam) U^T."""

    mu: np.ndarray
    cov: np.ndarray

    @property
    def dim(self) -> int:
        return self.mu.shape[0]

    def eig(self) -> tuple[np.ndarray, np.ndarray]:
        return np.linalg.eigh(self.cov)

    def model(self, sde: SDE) -> GaussianMixtureScore:
        return GaussianMixtureScore([1.0], self.mu[None], self.cov[None], sde)

    def sample(self, n: int, seed: int) -> np.ndarray:
        return np.random.default_rng(seed).multivariate_normal(self.mu, self.cov, size=n)

    def flow(self, sde: SDE, x: np.ndarray, t_from: float, t_to: float) -> np.ndarray:
        """Exact PF-ODE map: x_t = a_t mu + U diag(sqrt(v_t/v_s)) U^T (x_s - a_s mu), v = a^2 lam + sigma^2."""
        sch = schedule(sde)
        lam, u = self.eig()
        a_s, a_t = _at(sch.alpha, t_from), _at(sch.alpha, t_to)
        v_s = a_s**2 * lam + _at(sch.sigma, t_from) ** 2
        v_t = a_t**2 * lam + _at(sch.sigma, t_to) ** 2
        y = (np.asarray(x, dtype=np.float64) - a_s * self.mu) @ u
        return a_t * self.mu + (y * np.sqrt(v_t / v_s)) @ u.T


def gaussian(d: int = 4, seed: int = 0, mean_scale: float = 0.5, lam_lo: float = 0.2, lam_hi: float = 2.0) -> Gaussian:
    rng = np.random.default_rng(seed)
    return Gaussian(mean_scale * rng.standard_normal(d), random_spd(rng, d, lam_lo, lam_hi))


# ---- Gaussian mixtures --------------------------------------------------------------------------

@dataclass(frozen=True)
class GMM:
    """sum_k w_k N(mu_k, C_k) as numpy arrays."""

    weights: np.ndarray
    means: np.ndarray
    covs: np.ndarray

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def model(self, sde: SDE) -> GaussianMixtureScore:
        return GaussianMixtureScore(self.weights, self.means, self.covs, sde)

    def to_json(self) -> dict:
        return {"weights": self.weights.tolist(), "means": self.means.tolist(), "covariances": self.covs.tolist()}

    def sample(self, n: int, seed: int) -> np.ndarray:
        rng = np.random.default_rng(seed)
        k = rng.choice(len(self.weights), size=n, p=self.weights)
        chol = np.linalg.cholesky(self.covs)
        return self.means[k] + np.einsum("nij,nj->ni", chol[k], rng.standard_normal((n, self.dim)))

    # independent numpy density and score of p_t = sum_k w_k N(a mu_k, a^2 C_k + s^2 I)
    def _parts(self, sde: SDE, x: np.ndarray, t: float):
        sch = schedule(sde)
        a, s = _at(sch.alpha, t), _at(sch.sigma, t)
        x = np.atleast_2d(np.asarray(x, dtype=np.float64))
        logn, sol = [], []
        for mu, c in zip(self.means, self.covs):
            S = a * a * c + s * s * np.eye(self.dim)
            L = np.linalg.cholesky(S)
            r = x - a * mu
            z = np.linalg.solve(L, r.T)  # L^{-1} r
            logn.append(-0.5 * (z * z).sum(0) - np.log(np.diag(L)).sum() - 0.5 * self.dim * np.log(2 * np.pi))
            sol.append(np.linalg.solve(L.T, z).T)  # S^{-1} r
        logits = np.log(self.weights)[:, None] + np.array(logn)  # (K, N)
        return logits, np.array(sol)

    def log_prob(self, sde: SDE, x: np.ndarray, t: float) -> np.ndarray:
        return logsumexp(self._parts(sde, x, t)[0], axis=0)

    def score(self, sde: SDE, x: np.ndarray, t: float) -> np.ndarray:
        logits, sol = self._parts(sde, x, t)
        r = np.exp(logits - logsumexp(logits, axis=0))
        return -np.einsum("kn,knd->nd", r, sol)

    def reference_flow(self, sde: SDE, x: np.ndarray, t_from: float, t_to: float, tol: float = 1e-10) -> np.ndarray:
        """solve_ivp(DOP853) of dx/dt = f(t) x - 1/2 g2(t) score_t(x) in plain t, one sample at a time."""
        sch = schedule(sde)

        def rhs(t: float, y: np.ndarray) -> np.ndarray:
            return _at(sch.f, t) * y - 0.5 * _at(sch.g2, t) * self.score(sde, y, t)[0]

        out = []
        for xi in np.atleast_2d(x):
            sol = solve_ivp(rhs, (t_from, t_to), xi, method="DOP853", rtol=tol, atol=tol)
            assert sol.success, sol.message
            out.append(sol.y[:, -1])
        return np.array(out)


def random_gmm(d: int = 3, k: int = 3, seed: int = 0, mean_scale: float = 1.5,
               lam_lo: float = 0.1, lam_hi: float = 1.5) -> GMM:
    """Random weights, means and seeded random SPD covariances."""
    rng = np.random.default_rng(seed)
    w = rng.uniform(0.5, 1.5, k)
    means = mean_scale * rng.standard_normal((k, d))
    covs = np.stack([random_spd(rng, d, lam_lo, lam_hi) for _ in range(k)])
    return GMM(w / w.sum(), means, covs)


def mixed_difficulty_gmm(d: int = 4, seed: int = 0) -> GMM:
    """Two tight components (eigenvalues 1e-3..1e-2) and two wide ones (1..4), well separated."""
    rng = np.random.default_rng(seed)
    means = 2.0 * rng.standard_normal((4, d))
    covs = np.stack([random_spd(rng, d, 1e-3, 1e-2), random_spd(rng, d, 1e-3, 1e-2),
                     random_spd(rng, d, 1.0, 4.0), random_spd(rng, d, 1.0, 4.0)])
    return GMM(np.array([0.3, 0.2, 0.3, 0.2]), means, covs)


def mixed_batch(gmm: GMM, n: int, seed: int, n_tail: int = 32, tail_radius: float = 12.0) -> np.ndarray:
    """n samples of the mixture whose last n_tail rows are replaced by far-tail points."""
    x = gmm.sample(n, seed)
    rng = np.random.default_rng(seed + 1)
    u = rng.standard_normal((n_tail, gmm.dim))
    x[n - n_tail:] = tail_radius * u / np.linalg.norm(u, axis=1, keepdims=True) * rng.uniform(0.5, 1.0, (n_tail, 1))
    return x


# ---- networks derived from the exact score, wrapped by the adapters -------------------------------

def make_adapters(m: GaussianMixtureScore, gmm: GMM) -> dict:
    """EpsScore / VScore / DenoiserScore around networks derived from the exact mixture score."""
    sde = m.sde

    def eps_net(x, label):  # label = 999 t (DDPM-style time_fn), undone here
        t = label.double() / 999.0
        return -sde.sigma(t)[:, None] * m(x, t)

    def v_net(x, t):
        a, s = sde.alpha(t)[:, None], sde.sigma(t)[:, None]
        eps = -s * m(x, t)
        x0_hat = (x + s**2 * m(x, t)) / a
        return a * eps - s * x0_hat

    m_edm = gmm.model(EDMSDE())  # the data blurred at noise level sigma_hat, alpha = 1

    def denoiser(x_hat, sigma_hat):  # Tweedie: E[x0 | x_hat] = x_hat + sigma_hat^2 score_hat(x_hat)
        return x_hat + sigma_hat[:, None] ** 2 * m_edm(x_hat, sigma_hat)

    return {"eps": EpsScore(eps_net, sde, time_fn=lambda t: 999.0 * t), "v": VScore(v_net, sde),
            "denoiser": DenoiserScore(denoiser, sde)}


def t64(a: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(np.asarray(a), dtype=torch.float64)


SDES: dict[str, Callable[[], SDE]] = {"vp": VPSDE, "ve": VESDE, "edm": EDMSDE}
