"""Encode or decode a block of samples in device batches (pure torch/numpy; no Prefect, no Zarr)."""

from __future__ import annotations

import numpy as np
import torch

from pflatents.tasks.ode.pfode import SolverConfig, decode, encode
from pflatents.tasks.models.scores import ScoreModel
from pflatents.tasks.ode.sde import SDE

__all__ = ["encode_block", "decode_block", "DTYPES"]

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def _run(fn, model: ScoreModel, sde: SDE, block: np.ndarray, cfg: SolverConfig, batch_size: int,
         device: torch.device, dtype: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    out = np.empty(block.shape, dtype=np.float32)
    nfe = np.empty(block.shape[0], dtype=np.int32)
    status = np.empty(block.shape[0], dtype=np.int8)
    for i in range(0, block.shape[0], batch_size):
        x = torch.from_numpy(np.ascontiguousarray(block[i:i + batch_size])).to(device=device, dtype=DTYPES[dtype])
        res = fn(model, sde, x, cfg)
        out[i:i + batch_size] = res.x.to(torch.float32).cpu().numpy()
        nfe[i:i + batch_size] = res.nfe.cpu().numpy()
        status[i:i + batch_size] = res.status.cpu().numpy()
    return out, nfe, status


def encode_block(model: ScoreModel, sde: SDE, block: np.ndarray, cfg: SolverConfig, batch_size: int,
                 device: torch.device, dtype: str = "float32") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Latents (float32), NFE (int32) and status (int8) for each sample of a block (N, ...)."""
    return _run(encode, model, sde, block, cfg, batch_size, device, dtype)


def decode_block(model: ScoreModel, sde: SDE, block: np.ndarray, cfg: SolverConfig, batch_size: int,
                 device: torch.device, dtype: str = "float32") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Decoded samples (float32), NFE and status for each latent of a block."""
    return _run(decode, model, sde, block, cfg, batch_size, device, dtype)
