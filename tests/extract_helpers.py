"""Shared helpers for the extraction tests: a small GMM job on disk and a CLI runner."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

BIN = Path(sys.executable).parent


def write_gmm_job(d: Path, n: int = 2000, dim: int = 8, k: int = 3, seed: int = 0) -> tuple[Path, Path]:
    """A GMM model JSON and an .npy of samples drawn from it; returns (data path, model path)."""
    rng = np.random.default_rng(seed)
    means = rng.normal(0, 2, (k, dim))
    covs = []
    for _ in range(k):
        a = rng.normal(size=(dim, dim))
        covs.append(a @ a.T / dim + 0.1 * np.eye(dim))
    w = np.full(k, 1.0 / k)
    comp = rng.choice(k, n, p=w)
    chol = np.linalg.cholesky(np.stack(covs))
    x = means[comp] + np.einsum("nij,nj->ni", chol[comp], rng.normal(size=(n, dim)))
    model = d / "gmm.json"
    model.write_text(json.dumps({"weights": w.tolist(), "means": means.tolist(),
                                 "covariances": [c.tolist() for c in covs]}))
    data = d / "x.npy"
    np.save(data, x.astype(np.float32))
    return data, model


def cli(args: list[str], env: dict | None = None, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    """Run `pflatents ARGS` as a real subprocess."""
    return subprocess.run([str(BIN / "pflatents"), *args], env=env, capture_output=True, text=True,
                          timeout=timeout, **kw)


def tree_hash(root: Path) -> str:
    """Hash of every file's relative path and bytes under root (to prove a store was left untouched)."""
    h = hashlib.sha256()
    for p in sorted(Path(root).rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def env_with(env: dict, **extra: str) -> dict:
    out = dict(env)
    out.update(extra)
    return out


def no_traceback(text: str) -> bool:
    return "Traceback" not in text


__all__ = ["write_gmm_job", "cli", "tree_hash", "env_with", "no_traceback", "os"]
