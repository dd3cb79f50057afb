"""CUDA path check and throughput of the pure-torch core (no Prefect/Zarr needed on the GPU machine).

    python benchmarks/gpu_check.py [--n 65536] [--dim 64] [--k 8]

Encodes a GMM dataset on the GPU with dopri5 (per-sample control) and rk4 in float32 and float64,
prints samples/s, mean/max NFE, max |latent - float64 CPU reference| on a subset, and peak GPU memory.
"""

from __future__ import annotations

import argparse
import time

import torch

from pflatents.tasks.ode.pfode import SolverConfig, encode
from pflatents.tasks.models.scores import GaussianMixtureScore
from pflatents.tasks.ode.sde import VPSDE


def make_gmm(dim: int, k: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(k, dim, generator=g, dtype=torch.float64) * 1.5
    covs = []
    for _ in range(k):
        q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
        covs.append((q * (0.05 + 0.95 * torch.rand(dim, generator=g, dtype=torch.float64))) @ q.T)
    return torch.full((k,), 1.0 / k, dtype=torch.float64), means, torch.stack(covs)


def sample(w, means, covs, n: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    comp = torch.multinomial(w, n, replacement=True, generator=g)
    chol = torch.linalg.cholesky(covs)
    return means[comp] + torch.einsum("nij,nj->ni", chol[comp], torch.randn(n, means.shape[1], generator=g, dtype=torch.float64))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=65536)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu for a smoke run")
    a = ap.parse_args()
    dev = torch.device(a.device)
    cuda = dev.type == "cuda"
    assert not cuda or torch.cuda.is_available(), "no CUDA device visible"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    print(f"device: {torch.cuda.get_device_name(0) if cuda else 'cpu'}, torch {torch.__version__}")
    sde = VPSDE()
    w, means, covs = make_gmm(a.dim, a.k)
    gmm = GaussianMixtureScore(w, means, covs, sde)
    x = sample(w, means, covs, a.n)
    ref_n = 256
    ref = encode(gmm, sde, x[:ref_n], SolverConfig("dopri5", rtol=1e-10, atol=1e-10)).x
    print("| solver | dtype | batch | samples/s | mean NFE | max NFE | max err vs f64 ref | peak GPU MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for name, kw in (("dopri5", {"rtol": 1e-5, "atol": 1e-5}), ("rk4", {"steps": 10})):
        for dtype in (torch.float32, torch.float64):
            for batch in (4096, a.n):
                cfg = SolverConfig(name, **kw)
                xb = x.to(dev, dtype)
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                encode(gmm, sde, xb[:256], cfg)  # warm-up
                sync()
                t0 = time.perf_counter()
                outs, nfes = [], []
                for i in range(0, a.n, batch):
                    r = encode(gmm, sde, xb[i:i + batch], cfg)
                    outs.append(r.x)
                    nfes.append(r.nfe)
                sync()
                dt = time.perf_counter() - t0
                z, nfe = torch.cat(outs), torch.cat(nfes).float()
                err = (z[:ref_n].double().cpu() - ref).abs().max().item()
                mem = torch.cuda.max_memory_allocated() / 2**20 if cuda else 0.0
                print(f"| {name} | {str(dtype)[6:]} | {batch} | {a.n / dt:,.0f} | {nfe.mean():.1f} | {nfe.max():.0f} | "
                      f"{err:.2e} | {mem:,.0f} |")


if __name__ == "__main__":
    main()
