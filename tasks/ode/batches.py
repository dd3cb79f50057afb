"""Encode or decode a block of samples in device batches (pure torch/numpy; no Prefect, no Zarr)."""

from __future__ import annotations

import numpy as np
import torch

from pflatents.tasks.core import Model as ScoreModel, as_model, cond_tensor
from pflatents.tasks.errors import DataError
from pflatents.tasks.ode.pfode import SolverConfig, decode, encode
from pflatents.tasks.ode.sde import SDE

__all__ = ["encode_block", "decode_block", "DTYPES"]

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def _labels(model: ScoreModel, labels: np.ndarray | None, n: int) -> np.ndarray | None:
    """The labels the model is conditioned on: none for an unconditional model; a conditional one needs them."""
    if not model.conditional:
        return None
    if labels is None:
        raise DataError("the model is conditional (it takes a class label per sample) but the data has no labels; "
                        "give a source with labels")
    if len(labels) != n:
        raise DataError(f"{n} samples but {len(labels)} labels")
    return labels


def _run(fn, model: ScoreModel, sde: SDE, block: np.ndarray, cfg: SolverConfig, batch_size: int,
         device: torch.device, dtype: str, labels: np.ndarray | None = None
         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    model = as_model(model, sde)
    labels = _labels(model, labels, block.shape[0])
    out = None
    nfe = np.empty(block.shape[0], dtype=np.int32)
    status = np.empty(block.shape[0], dtype=np.int8)
    for i in range(0, block.shape[0], batch_size):
        x = torch.from_numpy(np.ascontiguousarray(block[i:i + batch_size])).to(device=device, dtype=DTYPES[dtype])
        cond = None if labels is None else cond_tensor(labels[i:i + batch_size], device)
        res = fn(model, sde, x, cfg, cond=cond)
        if out is None:  # the output's sample shape is the model's (a latent model's differs from the input's)
            out = np.empty((block.shape[0], *res.x.shape[1:]), dtype=np.float32)
        out[i:i + batch_size] = res.x.to(torch.float32).cpu().numpy()
        nfe[i:i + batch_size] = res.nfe.cpu().numpy()
        status[i:i + batch_size] = res.status.cpu().numpy()
    if out is None:
        out = np.empty(block.shape, dtype=np.float32)
    return out, nfe, status


def encode_block(model: ScoreModel, sde: SDE, block: np.ndarray, cfg: SolverConfig, batch_size: int,
                 device: torch.device, dtype: str = "float32", labels: np.ndarray | None = None
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Latents (float32), NFE (int32) and status (int8) for each sample of a block (N, ...); ``labels``
    (int64 (N,), or None) condition a conditional model, each batch on its own rows' labels."""
    return _run(encode, model, sde, block, cfg, batch_size, device, dtype, labels)


def decode_block(model: ScoreModel, sde: SDE, block: np.ndarray, cfg: SolverConfig, batch_size: int,
                 device: torch.device, dtype: str = "float32", labels: np.ndarray | None = None
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Decoded samples (float32), NFE and status for each latent of a block (conditioned like ``encode_block``)."""
    return _run(decode, model, sde, block, cfg, batch_size, device, dtype, labels)
