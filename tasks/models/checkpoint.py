"""Checkpoints of ``pflatents train``: a directory with ``model.safetensors`` + ``config.json``.

- ``model.safetensors``: the EMA weights and the data statistics buffers (``data_mean``, ``data_var``);
  loaded with ``safetensors`` only, so loading a checkpoint never runs code.
- ``config.json``: the network (architecture, parameters, sample shape, prediction type, time label),
  the SDE and its parameters, the data (spec, fingerprint, normalisation), the training settings and
  summary, ``provenance`` (wall time, versions, creation time) and ``content_hash``.

``content_hash = sha256(model.safetensors bytes + canonical JSON of config.json without
"content_hash" and "provenance")``, so the same seed and settings give the same hash on a machine.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from pflatents.tasks.models.adapters import DeviceNet
from pflatents.tasks.errors import ModelError
from pflatents.tasks.models.networks import GaussianPrecond, build_network
from pflatents.tasks.models.scores import EpsScore
from pflatents.tasks.ode.sde import SDE, make_sde

__all__ = ["save_checkpoint", "load_checkpoint", "read_config", "is_checkpoint_dir", "CheckpointScore",
           "checkpoint_sde", "sde_from_dict", "WEIGHTS", "CONFIG", "FORMAT"]

WEIGHTS, CONFIG, FORMAT, VERSION = "model.safetensors", "config.json", "pflatents.checkpoint", 1
UNHASHED = ("content_hash", "provenance")


def sde_from_dict(d: dict) -> SDE:
    """Rebuild any SDE from its ``to_dict`` form (vp, ve, edm, vp_discrete)."""
    if d.get("name") == "vp_discrete":
        from pflatents.tasks.ode.discrete import DiscreteVPSDE

        return DiscreteVPSDE(alphas_cumprod=tuple(d["alphas_cumprod"]))
    return make_sde(d["name"], **{k: v for k, v in d.items() if k != "name"})


def _canonical(cfg: dict) -> bytes:
    return json.dumps({k: v for k, v in cfg.items() if k not in UNHASHED}, sort_keys=True,
                      separators=(",", ":")).encode()


def content_hash(weights: bytes, cfg: dict) -> str:
    """sha256 of the weights file's bytes followed by the canonical config."""
    return hashlib.sha256(weights + _canonical(cfg)).hexdigest()


def is_checkpoint_dir(path: str | Path) -> bool:
    p = Path(path)
    return p.is_dir() and (p / CONFIG).is_file()


def save_checkpoint(out: str | Path, net: GaussianPrecond, cfg: dict, overwrite: bool = False) -> str:
    """Write ``out/model.safetensors`` + ``out/config.json`` atomically (temp dir, then rename).

    ``cfg`` holds everything but ``content_hash``, which is computed here and returned.
    """
    from safetensors.torch import save_file

    out = Path(out).expanduser().resolve()
    if out.exists() and not overwrite:
        raise ModelError(f"{out} already exists; pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        state = {k: v.detach().to("cpu").contiguous() for k, v in net.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt"})
        doc = {"format": FORMAT, "version": VERSION, **cfg}
        doc["content_hash"] = content_hash((tmp / WEIGHTS).read_bytes(), doc)
        (tmp / CONFIG).write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return doc["content_hash"]


def read_config(path: str | Path) -> dict:
    """config.json of a checkpoint dir, checked for the keys a load needs."""
    p = Path(path) / CONFIG
    try:
        doc = json.loads(p.read_text())
    except FileNotFoundError:
        raise ModelError(f"not a pflatents checkpoint: {p} is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"cannot read checkpoint config {p}: {e}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ModelError(f"{p} is not a pflatents checkpoint config (format {FORMAT!r} expected); "
                         "a diffusers model directory is given as diffusers:DIR")
    if doc.get("version") != VERSION:
        raise ModelError(f"{p}: checkpoint version {doc.get('version')!r} is not supported (expected {VERSION})")
    for key in ("network", "sde", "content_hash"):
        if key not in doc:
            raise ModelError(f"{p}: missing key {key!r}")
    return doc


def checkpoint_sde(path: str | Path) -> SDE:
    """The SDE a checkpoint was trained under."""
    doc = read_config(path)
    try:
        return sde_from_dict(doc["sde"])
    except (KeyError, TypeError, ValueError) as e:
        raise ModelError(f"{Path(path) / CONFIG}: bad SDE description {doc['sde']!r}: {e}") from None


class CheckpointScore(EpsScore):
    """Score of a trained checkpoint: EpsScore around the EMA net, time label s = log(sigma/alpha)."""

    def __init__(self, net: GaussianPrecond, sde: SDE, doc: dict) -> None:
        super().__init__(DeviceNet(net), sde, time_fn=sde.s_of_t)
        self.module = net
        self.config = doc
        self.content_hash = doc["content_hash"]
        self.sample_shape = tuple(net.sample_shape)
        self.dim = int(torch.Size(self.sample_shape).numel())


def load_checkpoint(path: str | Path, sde: SDE | None = None) -> CheckpointScore:
    """Load a checkpoint dir through safetensors (never pickle) and verify its content hash."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    p = Path(path)
    doc = read_config(p)
    wpath = p / WEIGHTS
    try:
        raw = wpath.read_bytes()
    except FileNotFoundError:
        raise ModelError(f"checkpoint {p} has no {WEIGHTS} (weights are read from safetensors only)") from None
    got = content_hash(raw, doc)
    if got != doc["content_hash"]:
        raise ModelError(f"checkpoint {p} does not match its recorded content hash ({got[:12]} != "
                         f"{str(doc['content_hash'])[:12]}): a file was changed after it was written")
    native = checkpoint_sde(p)
    if sde is not None and sde.to_dict() != native.to_dict():
        raise ModelError(f"checkpoint {p} was trained under the SDE {native.to_dict()}; it cannot give the "
                         f"score under {sde.to_dict()} (use --sde {native.name})")
    nw = doc["network"]
    try:
        net = build_network(nw["arch"], tuple(nw["sample_shape"]), nw.get("family", "vp"), **nw.get("params", {}))
        state = load(raw)
        net.load_state_dict(state, strict=True)
    except SafetensorError as e:
        raise ModelError(f"{wpath} is not a valid safetensors file: {e}") from None
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise ModelError(f"checkpoint {p}: weights do not fit the network in {CONFIG}: {str(e).splitlines()[0]}") from None
    return CheckpointScore(net, native, doc)
