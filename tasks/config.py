"""The one frozen config of an extraction, built and validated before anything runs or is written.

It is serialised into the store's ``pflatents`` attrs and compared on reopen: the same config
continues a store, a different one is refused (naming the differing fields).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pflatents.tasks.errors import InputError
from pflatents.tasks.models.registry import model_info, native_sde
from pflatents.tasks.ode.pfode import ADAPTIVE, SolverConfig
from pflatents.tasks.ode.sde import SDE, make_sde

__all__ = ["ExtractConfig", "build_config", "sde_from_dict", "solver_from_dict"]


@dataclass(frozen=True)
class ExtractConfig:
    """Everything that decides the latents (device and runner do not: they are recorded per shard)."""

    data: dict
    model: dict
    sde: dict
    solver: dict
    shard_size: int
    batch_size: int
    dtype: str = "float32"
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"data": self.data, "model": self.model, "sde": self.sde, "solver": self.solver,
                "shard_size": self.shard_size, "batch_size": self.batch_size, "dtype": self.dtype}

    @classmethod
    def from_dict(cls, d: dict) -> "ExtractConfig":
        return cls(data=d["data"], model=d["model"], sde=d["sde"], solver=d["solver"],
                   shard_size=int(d["shard_size"]), batch_size=int(d["batch_size"]), dtype=d.get("dtype", "float32"))

    def make_sde(self) -> SDE:
        return sde_from_dict(self.sde)

    def make_solver(self) -> SolverConfig:
        return solver_from_dict(self.solver)


def sde_from_dict(d: dict) -> SDE:
    """Rebuild an SDE from its ``to_dict`` form (vp, ve, edm, and vp_discrete of diffusers models)."""
    from pflatents.tasks.models.checkpoint import sde_from_dict as _from_dict

    return _from_dict(d)


def choose_sde(sde_name: str, model_spec: str) -> SDE:
    """The SDE to integrate under: a model trained under its own SDE (checkpoint, diffusers) runs under it.

    ``--sde`` must name its family (``vp`` also selects a diffusers model's discrete VP schedule)."""
    native = native_sde(model_spec)
    if native is None:
        return make_sde(sde_name)
    if sde_name == native.name or (sde_name == "vp" and native.name == "vp_discrete"):
        return native
    raise InputError(f"the model {model_spec} was trained under the {native.name} SDE; --sde {sde_name} does "
                     f"not match it (use --sde {'vp' if native.name == 'vp_discrete' else native.name})")


def solver_from_dict(d: dict) -> SolverConfig:
    """Rebuild a SolverConfig from its ``to_dict`` form.

    Adaptive configs pinned before ``time_var`` existed integrated in s: they keep doing so."""
    d = dict(d)
    if d.get("name") in ADAPTIVE and "time_var" not in d:
        d["time_var"] = "s"
    return SolverConfig(**d)


def _positive_int(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise InputError(f"{name} must be an integer >= 1; got {v!r}")
    return v


def build_config(*, source, model_spec: str, sde_name: str = "vp", solver: str = "dopri5",
                 rtol: float = 1e-5, atol: float = 1e-5, steps: int = 50, grid: str = "logsnr",
                 t_eps: float = 1e-5, shard_size: int, batch_size: int = 1024, dtype: str = "float32",
                 incremental: bool = False) -> ExtractConfig:
    """Validate every setting against the data and the model, and freeze them into one config.

    ``incremental``: the data may grow, so its length and fingerprint are not part of the pinned
    identity; the store keeps the length and fingerprint of the planned prefix instead.
    """
    if dtype not in ("float32", "float64"):
        raise InputError(f"dtype must be float32 or float64; got {dtype!r}")
    _positive_int("shard size", shard_size)
    _positive_int("batch size", batch_size)
    sde = choose_sde(sde_name, model_spec)
    sde.check_t_eps(t_eps)
    scfg = SolverConfig(name=solver, rtol=rtol, atol=atol, steps=steps, grid=grid, t_eps=t_eps)
    info = model_info(model_spec, sde)
    d = 1
    for n in source.sample_shape:
        d *= n
    if info.dim is not None and info.dim != d:
        raise InputError(f"sample shape {tuple(source.sample_shape)} ({d} values) does not match the model "
                         f"{info.spec} (dimension {info.dim})")
    if incremental:
        data = {"spec": source.spec, "incremental": True, "sample_shape": list(source.sample_shape),
                "dtype": str(source.dtype)}
    else:
        data = {"spec": source.spec, "fingerprint": source.fingerprint(), "n_samples": len(source),
                "sample_shape": list(source.sample_shape), "dtype": str(source.dtype)}
    return ExtractConfig(data=data, model=info.to_dict(), sde=sde.to_dict(), solver=scfg.to_dict(),
                         shard_size=shard_size, batch_size=batch_size, dtype=dtype)
