"""The true end point of the PF-ODE, p_T, as the target of the latent tests.

Exact latents follow p_T, not N(0, I): x_T = alpha_T x_0 + sigma_T eps, so for ANY data law with mean
mu and covariance Sigma, p_T has mean alpha_T mu and covariance alpha_T^2 Sigma + sigma_T^2 I exactly
(its higher cumulants are those of the data scaled by alpha_T^k). For VP alpha_T = exp(-5.025) =
6.6e-3; for VE/EDM alpha = 1 and sigma_T = sigma_max. So the analysis standardises the latents (in
prior-std units) by p_T's mean and covariance -- the symmetric inverse square root, which stays close
to the identity, so coordinate j is still dim j -- and then projects out the data's degenerate
directions. It also says below which N the plain N(0, I) target cannot be told apart from p_T.

Pure numpy / torch (the SDE's alpha and sigma).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats

from pflatents.tasks.analysis.normality import per_test_level
from pflatents.tasks.analysis.spectrum import DataSpectrum

__all__ = ["PriorTarget", "alpha_sigma_T", "prior_target", "standard_target"]


@dataclass(frozen=True)
class PriorTarget:
    """Latents in prior-std units x are tested as (x - shift) @ matrix against N(0, I_r)."""

    shift: np.ndarray | None       # (D,) p_T's mean in prior-std units; None: N(0, I) target
    matrix: np.ndarray | None      # (D, r): p_T whitening then the non-degenerate basis; None: identity
    info: dict[str, Any]           # the ``prior_target`` block of the summary
    degenerate_var: np.ndarray | None = None  # p_T's variance along each degenerate data direction

    def apply(self, x: np.ndarray) -> np.ndarray:
        """The tested coordinates of rows ``x`` (N, D), in prior-std units."""
        x = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
        return x if self.matrix is None else (x - self.shift) @ self.matrix


def alpha_sigma_T(sde: Any) -> tuple[float, float]:
    """alpha(T) and sigma(T) of an SDE as floats."""
    import torch

    t = torch.tensor([float(sde.T)], dtype=torch.float64)
    return float(sde.alpha(t)[0]), float(sde.sigma(t)[0])


def _inv_sqrt(c: np.ndarray) -> np.ndarray:
    """Symmetric inverse square root of a positive definite matrix."""
    lam, u = np.linalg.eigh(c)
    return (u / np.sqrt(lam)) @ u.T


def _n_indistinguishable(mean: np.ndarray, var: np.ndarray, alpha: float) -> float | None:
    """Sample size below which per-dim mean/variance tests (at the per-test level) cannot tell
    N(0, I) from p_T: the N where the largest shift equals the test's critical value."""
    z = float(stats.norm.isf(per_test_level(alpha, len(mean)) / 2))
    shifts = [np.abs(mean) / np.sqrt(var), np.abs(var - 1.0) / np.sqrt(2.0)]
    worst = max(float(s.max()) for s in shifts) if len(mean) else 0.0
    return None if worst == 0 else (z / worst) ** 2


def standard_target(reason: str) -> PriorTarget:
    """N(0, I) in prior-std units, with the reason the exact p_T is not used."""
    return PriorTarget(None, None, {"target": "N(0, I)", "reason": reason})


def prior_target(spec: DataSpectrum, sde: Any, alpha: float = 0.05) -> PriorTarget:
    """p_T's Gaussian part given the data's mean and covariance, and the tested coordinates."""
    a_t, s_t = alpha_sigma_T(sde)
    ps = float(sde.prior_std)
    mean = a_t * spec.mean / ps
    cov = (a_t ** 2 * spec.cov + s_t ** 2 * np.eye(spec.d)) / ps ** 2
    white = _inv_sqrt(cov)
    matrix = white @ spec.basis
    var = np.diag(cov)
    deg_var = np.einsum("dk,de,ek->k", spec.degenerate, cov, spec.degenerate)
    n_star = _n_indistinguishable(mean, var, alpha)
    info = {"target": "p_T: N(alpha_T mu, alpha_T^2 Sigma + sigma_T^2 I) from the data's mean and covariance",
            "alpha_T": a_t, "sigma_T": s_t, "prior_std": ps,
            "max_abs_mean_shift": float(np.abs(mean).max()) if len(mean) else 0.0,
            "max_abs_var_minus_1": float(np.abs(var - 1).max()) if len(var) else 0.0,
            "n_indistinguishable_from_standard_normal": n_star,
            "coordinates": ("the latent dims" if spec.axis_aligned and spec.degenerate.shape[1] == 0 else
                            f"{spec.rank} coordinates of the non-degenerate subspace" +
                            (" (the non-constant dims)" if spec.axis_aligned else
                             " (each close to one latent dim)")),
            "coordinate_dims": spec.coord_dims.tolist()}
    return PriorTarget(mean, matrix, info, deg_var)
