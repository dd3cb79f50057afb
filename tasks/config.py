"""The job settings, in one typed model each: what the user asks for, and what the store pins.

``JobSettings`` is what to extract and how (the ``extract``/``serve`` flags, the keys of a serve job
file, the keywords of ``pflatents.extract``); its field defaults are the only job defaults.
``build_config`` validates a job against its data and model and freezes it into an ``ExtractConfig``:
everything that decides the latents, written as plain JSON into the store's ``pflatents`` attrs and
compared on reopen (the same config continues a store, a different one is refused naming the fields).
``ExtractConfig.from_store`` reads the job pinned in a store of any format (``migrate``: format 1 stores
are read in today's explicit form, and rewritten so by the next extract or resume); it is the one way
every caller rebuilds a job from a store. ``data``, ``model``, ``sde`` and ``solver`` are typed frozen
specs; JSON appears only at the store boundary.

Adding a setting is a change in this file:
1. a field of ``JobSettings`` with its type, default and a ``description`` (the help text). The CLI
   (``pflatents.flows.cli.common.add_model_args``) makes it a flag ``--the-name`` of ``extract`` and
   ``serve``; serve job files and the Python API accept it by name. Nothing else lists settings.
2. if it decides the latents, a field of ``ExtractConfig`` whose default is what stores pinned before
   the field existed did (so they keep opening and continuing), set from the job in ``build_config``.
   Settings that only say how to run (runner, workers, device) are not pinned.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pflatents.tasks.data.registry import specs_help
from pflatents.tasks.errors import InputError

__all__ = ["JobSettings", "ExtractConfig", "DataSpec", "ModelSpec", "SDESpec", "SolverSpec", "migrate", "CONFIG_FORMAT", "build_config",
           "job_sde", "DEFAULT_BATCH_SIZE", "job_batch_size", "sde_from_dict", "solver_from_dict", "validation_message"]


SOURCE_OPTIONS = ("resolution", "channels", "interpolation", "skip_bad", "image_key", "label_key", "image_column",
                  "label_column", "id_column")


DEFAULT_BATCH_SIZE = 1024  # samples integrated together when neither the job nor an existing store says


def job_batch_size(job: "JobSettings", pinned: Optional[Mapping[str, Any]] = None) -> int:
    """The batch size to pin: the job's, else the existing store's (like its shard size: a store made
    with another batch size continues with the default flags), else ``DEFAULT_BATCH_SIZE``. An explicit
    batch size that differs from the store's is refused by the store's config check, naming both."""
    if job.batch_size is not None:
        return job.batch_size
    size = (pinned or {}).get("batch_size")
    return size if isinstance(size, int) and not isinstance(size, bool) and size >= 1 else DEFAULT_BATCH_SIZE


class JobSettings(BaseModel):
    """What to extract and how: the one list of job settings and their defaults."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    data: str = Field(description=specs_help())
    model: str = Field(description="gmm:params.json | checkpoint dir | diffusers:DIR")
    out: str = Field(description="output store (path or fsspec URL, e.g. s3://bucket/x.zarr)")
    sde: Literal["vp", "ve", "edm", "flow"] = Field("vp", description="the SDE family (default: the model's own, which a "
                                                                     "checkpoint, a diffusers folder's scheduler or a py: "
                                                                     "declaration gives; vp for a gmm; flow: x_t = "
                                                                     "(1 - t) x0 + t eps)")
    t_eps: float = Field(1e-4, gt=0, description="integrate from t_eps (not 0); 1e-4: VP sigma 3.2e-3, below half an "
                                                "8-bit step, and the learned-model benchmark's error at 1e-5..1e-3 "
                                                "alike")
    solver: Optional[str] = Field(
        None, description="adams4 | adams5 | dopri5 | dop853 | dpm23 | rk4 | heun | euler | dpmpp2m (default: adams4 for a "
                          "network, dopri5 for an exact gmm score or a flow model; with no solver setting given, an "
                          "existing store keeps the solver it pinned)")
    rtol: Optional[float] = Field(None, gt=0, description="relative tolerance of an adaptive solver (default: adams4 "
                                                         "3e-5, the others 1e-6; adams4 3e-5, t_eps 1e-4, float32 "
                                                         "network: per-sample p99 latent error 3e-5..3e-4 on the "
                                                         "learned-model benchmark at 200-265 NFE)")
    atol: Optional[float] = Field(None, gt=0, description="absolute tolerance of an adaptive solver (default as rtol)")
    control: Optional[Literal["local", "latent"]] = Field(
        None, description="dopri5 error control: latent (encode tolerance weighted by sigma(t)/sigma(T), the "
                          "flow's error amplification: a bound on each step's share of the latent error) | local; "
                          "default latent for a network, local for an exact gmm score (15%% fewer NFE there at "
                          "equal worst error)")
    steps: int = Field(50, ge=1, description="steps of a fixed-step solver")
    grid: str = Field("logsnr", description="time grid of fixed-step solvers: logsnr | edm | time")
    shard_size: Optional[int] = Field(None, ge=1, description="samples per shard (default: chunks of ~8 MiB and at "
                                                             "least one batch; an existing store keeps its own)")
    batch_size: Optional[int] = Field(None, ge=1, description=f"samples integrated together (default "
                                                             f"{DEFAULT_BATCH_SIZE}; an existing store keeps its own)")
    dtype: Literal["float32", "float64"] = Field("float32", description="dtype of the ODE state")
    precision: Optional[Literal["fp32", "tf32", "bf16", "fp64"]] = Field(
        None, description="network evaluation: fp32 | tf32 | bf16 | fp64 (default fp64 with --dtype float64, "
                          "else fp32; TF32 only with tf32; pinned)")
    compile: Literal["auto", "on", "off"] = Field(
        "auto", description="torch.compile the network (auto: on a GPU, never on a CPU; an existing "
                                "store keeps its own mode; pinned)")
    incremental: bool = Field(False, description="the data may grow: extract only samples new since the last run "
                                                 "into the same store (always on for npydir:DIR)")
    latent_tol: Optional[float] = Field(
        None, gt=0, description="per-sample latent error (p99, max-abs) wanted: the job's first step, a pilot, picks "
                                "the cheapest setting of every solver and grid (steps, tolerances) whose p99 on 128 "
                                "seeded samples is at most E/2 against a float64 run, checked on 128 others (<= E, "
                                "else one rung more accurate), or says none does; pinned with its curve "
                                "(`pflatents status`); explicit --solver/--rtol/--atol/--steps win")
    # options of the image sources (imagefolder:, wds:, parquet:); pinned with the data spec
    resolution: Optional[int] = Field(
        None, ge=1, description="image sources: resize each image's short side to R and centre-crop it to R x R "
                                "(diffusers' training transform; default: every image must have the first one's size)")
    channels: Optional[Literal[1, 3]] = Field(
        None, description="image sources: 3 (RGB) or 1 (grey) (default: what the model takes when its dimension "
                          "says so, else 3)")
    interpolation: Optional[Literal["bilinear", "bicubic", "lanczos", "nearest"]] = Field(
        None, description="image sources: resampling for --resolution (default bilinear, as diffusers' scripts)")
    skip_bad: bool = Field(False, description="image sources: skip unreadable images (every image is decoded once to "
                                              "find them) and list them in the store and the summary, instead of "
                                              "refusing the data")
    image_key: Optional[str] = Field(None, description="wds: the image member of a sample (default: the first of "
                                                       "png, jpg, jpeg, webp in the first sample)")
    label_key: Optional[str] = Field(None, description="wds: the label member (default cls when samples have one; "
                                                       "'' for none)")
    image_column: Optional[str] = Field(None, description="parquet: the image column (default image, else img)")
    label_column: Optional[str] = Field(None, description="parquet: the class label column (default label when "
                                                          "there is one; '' for none)")
    id_column: Optional[str] = Field(None, description="parquet: the sample id column (default: FILE:ROW)")
    class_label: Optional[int] = Field(
        None, description="class-conditional models: condition every sample on class K instead of the source's "
                          "labels (an unlabelled source is then accepted); pinned; the store's label array keeps "
                          "the source's labels")

    def source_options(self) -> dict[str, Any]:
        """The source options given (``open_source(spec, **options)``; the data's kind says which it takes)."""
        return {k: getattr(self, k) for k in SOURCE_OPTIONS if getattr(self, k) not in (None, False)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "JobSettings":
        """Build from plain keys (``t-eps`` and ``t_eps`` alike); bad or unknown keys are an InputError."""
        norm = {str(k).replace("-", "_"): v for k, v in d.items()}
        unknown = sorted(set(norm) - set(cls.model_fields))
        if unknown:
            raise InputError(f"unknown job setting(s) {', '.join(unknown)}; known: {', '.join(cls.model_fields)}")
        missing = [k for k in ("data", "model", "out") if not norm.get(k)]
        if missing:
            raise InputError(f"the job needs {', '.join(missing)} (flags --{' --'.join(missing)} or config keys)")
        try:
            return cls(**norm)
        except ValidationError as e:
            raise InputError(validation_message(e)) from None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON of the settings given (the form serve passes to its scheduled runs): ``from_dict``
        of it is this job, with the same settings given, so a scheduled run, too, lets a store keep its
        solver and ``--latent-tol`` run its pilot where no solver setting was given."""
        return self.model_dump(exclude_unset=True)


def validation_message(e: ValidationError) -> str:
    """One line per bad value: the setting (and its flag), what is wrong, the value given."""
    lines = []
    for err in e.errors():
        name = ".".join(str(p) for p in err["loc"]) or "settings"
        flag = "--" + name.replace("_", "-")
        lines.append(f"{name.replace('_', ' ')} ({flag}): {err['msg'][0].lower()}{err['msg'][1:]}; "
                     f"got {err.get('input')!r}")
    return "; ".join(lines)


Num = Union[int, float]  # a number kept as given (an int stays an int in the pinned JSON and its hash)


class PinnedSpec(BaseModel):
    """A frozen, typed part of the pinned config. Code reads its fields as attributes; ``to_dict`` is
    its JSON (what the store holds). It also reads like that JSON (``spec["rtol"]``, ``spec.get(...)``,
    equal to the same dict), the form stores, records and earlier code use."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)

    def __getitem__(self, key: str) -> Any:
        return self.to_dict()[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.to_dict().get(key, default)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Mapping):
            return self.to_dict() == dict(other)
        return isinstance(other, PinnedSpec) and type(self) is type(other) and self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash(json.dumps(self.to_dict(), sort_keys=True))


class DataSpec(PinnedSpec):
    """The data's identity: spec and sample shape/dtype, and either its fingerprint and length (a fixed
    source) or ``incremental`` (a growing one: the store keeps the planned prefix's fingerprint)."""

    spec: str
    fingerprint: Optional[str] = None
    n_samples: Optional[int] = None
    incremental: Optional[bool] = None
    sample_shape: list[int]
    dtype: str
    options: Optional[dict[str, Any]] = None  # the source's options (Source.pinned): reopen it as it was
    classes: Optional[list[str]] = None  # a labelled source's class names, label k = classes[k]


class ModelSpec(PinnedSpec):
    """The model: its resolved spec (``kind:PATH``), kind, content hash and dimension (None: any)."""

    spec: str
    kind: str
    content_hash: str
    dim: Optional[int]
    latent_shape: Optional[list[int]] = None  # a latent model's state shape (absent: the data's shape)

    def to_dict(self) -> dict[str, Any]:
        d = self.model_dump()  # "dim": null is pinned as such
        if d["latent_shape"] is None:
            del d["latent_shape"]
        return d


class SDESpec(PinnedSpec):
    """The SDE: its name and its parameters (``SDE.to_dict()``; each family has its own)."""

    model_config = ConfigDict(frozen=True, extra="allow")

    name: str

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()

    def make(self):
        """The SDE object."""
        return sde_from_dict(self.to_dict())


class SolverSpec(PinnedSpec):
    """The solver settings that decide the result (``SolverConfig.to_dict()``): tolerances, step limit,
    time variable and control for an adaptive solver; steps and grid for the others."""

    name: str
    t_eps: Optional[Num] = None
    rtol: Optional[Num] = None
    atol: Optional[Num] = None
    max_steps: Optional[int] = None
    time_var: Optional[str] = None
    control: Optional[str] = None
    noise: Optional[Num] = None
    noise_t: Optional[list[list[Num]]] = None
    weight_power: Optional[Num] = None
    steps: Optional[int] = None
    grid: Optional[str] = None

    def make(self):
        """The ``SolverConfig``."""
        return solver_from_dict(self.to_dict())


class ExtractConfig(BaseModel):
    """Everything that decides the latents (device and runner do not: they are recorded per shard).

    ``data``, ``model``, ``sde`` and ``solver`` are typed frozen specs (``DataSpec``, ``ModelSpec``,
    ``SDESpec``, ``SolverSpec``); JSON appears only at the store (``to_dict`` / ``from_dict``, and
    ``from_store``, the one way every caller rebuilds a job from a store).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    data: DataSpec
    model: ModelSpec
    sde: SDESpec
    solver: SolverSpec
    shard_size: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    dtype: Literal["float32", "float64"] = "float32"  # pinned since the first release; absent means float32
    # network precision and compilation (pflatents.tasks.models.precision); absent: float32 weights, eager
    precision: Literal["fp32", "tf32", "bf16", "fp64"] = "fp32"
    compile: Literal["auto", "on", "off"] = "off"
    # --latent-tol: the target, the pilot's choice and figures (pflatents.tasks.ode.pilot); absent: none asked
    pilot: Optional[dict[str, Any]] = None
    # --class-label K: every row conditions the network on class K, not on the source's label; absent: the
    # source's labels (what every store pinned before the field existed did)
    class_label: Optional[int] = Field(None, ge=0)

    def to_dict(self) -> dict[str, Any]:
        """The pinned JSON (the store's ``pflatents.config``); no ``pilot`` key when none ran."""
        d = {"data": self.data.to_dict(), "model": self.model.to_dict(), "sde": self.sde.to_dict(),
             "solver": self.solver.to_dict(), "shard_size": self.shard_size, "batch_size": self.batch_size,
             "dtype": self.dtype, "precision": self.precision, "compile": self.compile}
        if self.pilot is not None:
            d["pilot"] = self.pilot
        if self.class_label is not None:
            d["class_label"] = self.class_label
        return d

    def cond_labels(self, labels: Optional[Any], n: int) -> Optional[Any]:
        """The class labels a shard's ``n`` rows condition the network on: class ``class_label`` for every
        row when one is pinned, else the source's ``labels`` (None when it has none). The store's ``label``
        array keeps the source's labels either way."""
        if self.class_label is None:
            return labels
        import numpy as np

        return np.full(n, self.class_label, dtype=np.int64)

    @classmethod
    def from_store(cls, store) -> "ExtractConfig":
        """The job pinned in a store (a ``LatentStore``, or anything with ``config`` and
        ``format_version``): stores of an earlier format are read through ``migrate``."""
        return cls.from_dict(store.config, store.format_version)

    @property
    def latent_shape(self) -> tuple[int, ...]:
        """The shape of one stored latent: the model's latent shape (a latent model), else the data's."""
        return tuple(self.model.latent_shape or self.data.sample_shape)

    def open_source(self):
        """The pinned data source."""
        from pflatents.tasks.data.sources import open_source

        return open_source(self.data.spec)

    def load_model(self, precision: Optional[str] = "pinned", compile: Optional[str] = None):
        """The pinned model under the pinned SDE, at the pinned precision and compile mode (or the ones given)."""
        from pflatents.tasks.models.registry import load_model

        return load_model(self.model.spec, self.make_sde(), precision=self.precision if precision == "pinned"
                          else precision, compile=self.compile if compile is None else compile)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], format_version: int = 1) -> "ExtractConfig":
        """Read a pinned config of a store of ``format_version`` (1 by default: any config written so
        far, read through ``migrate``; a format-2 config is read as it is)."""
        try:
            return cls(**migrate(d, format_version))
        except ValidationError as e:
            raise InputError(f"the store's pinned config is not readable: {validation_message(e)}") from None
        except (KeyError, TypeError) as e:
            raise InputError(f"the store's pinned config is not readable: missing or malformed {e}") from None

    def pinned_like(self, stored: dict[str, Any]) -> dict[str, Any]:
        """``stored`` when it means this config (an older spelling of the same settings), else ``to_dict()``
        with the fields that mean the same in ``stored``'s spelling (absent ones left out).

        Pass the result to the store's config check: a store pinned by an earlier version with
        the same meaning continues, anything else is refused naming the fields that differ in
        meaning (not, say, a ``compile`` absent from an old store where this config pins off)."""
        try:
            old = ExtractConfig.from_dict(stored)
        except (InputError, KeyError, TypeError):
            return self.to_dict()
        if old == self:
            return stored
        new = self.to_dict()
        for k in ExtractConfig.model_fields:
            if getattr(old, k) == getattr(self, k):
                if k in stored:
                    new[k] = stored[k]
                else:
                    new.pop(k, None)
        return new

    def make_sde(self):
        return self.sde.make()

    def make_solver(self):
        return self.solver.make()


CONFIG_FORMAT = 2  # the store format (pflatents.storage.layout.FORMAT_VERSION) whose pinned config is canonical


def migrate(config: Mapping[str, Any], format_version: int) -> dict[str, Any]:
    """A pinned config of a store of ``format_version`` in the canonical form of format 2.

    Format 1 (every store written before the format was bumped) pinned some settings implicitly:
    an ``extra`` key; adaptive solvers without ``time_var`` (they integrated in s) or with ``auto`` (the
    SDE's choice); no ``precision`` for an exact score (it ran in the state's dtype) nor for networks
    (fp32), no ``compile`` (eager), no ``dtype`` (float32). Format 2 spells every one of them out, so
    a format-2 config is read as it is; the coordinator rewrites a format-1 store once, in this form,
    on the next extract or resume (``LatentStore.upgrade``). Idempotent on canonical configs.
    """
    d = dict(config)
    if format_version >= CONFIG_FORMAT:
        return d
    d.pop("extra", None)
    d["solver"] = _pinned_solver(d["solver"], d["sde"])
    if "precision" not in d and _exact(d.get("model", {}).get("kind")):
        from pflatents.tasks.models.precision import ANALYTIC_PRECISION

        d["precision"] = ANALYTIC_PRECISION[d.get("dtype", "float32")]  # an exact score ran in the state's dtype
    return d


def _exact(kind) -> bool:
    """Whether the model kind is an exact score (``ModelKind.exact``: no network precision, nothing to
    compile, local error control by default)."""
    from pflatents.tasks.models.registry import exact_kind

    return exact_kind(str(kind))


def _pinned_solver(solver: dict[str, Any], sde: dict[str, Any]) -> dict[str, Any]:
    """Adaptive configs pinned before ``time_var`` existed integrated in s; ``auto`` meant the SDE's choice."""
    from pflatents.tasks.ode.pfode import ADAPTIVE

    solver = dict(solver)
    if solver.get("name") in ADAPTIVE:
        if "time_var" not in solver:
            solver["time_var"] = "s"
        elif solver["time_var"] == "auto":
            solver["time_var"] = sde_from_dict(sde).preferred_time_var
    return solver


def sde_from_dict(d: dict):
    """Rebuild an SDE from its ``to_dict`` form (vp, ve, edm, and vp_discrete of diffusers models)."""
    from pflatents.tasks.models.checkpoint import sde_from_dict as _from_dict

    return _from_dict(d)


def choose_sde(sde_name: str, model_spec: str, explicit: bool = True):
    """The SDE to integrate under: a model that declares its own (a checkpoint, a diffusers folder's
    scheduler: vp or flow, a ``py:`` declaration) runs under it; ``sde_name`` only for models that take
    any (gmm).

    Without an explicit ``--sde`` (``explicit=False``) the model's own SDE is taken, so a flow-matching
    folder runs as a flow with no flag; an explicit ``--sde`` must name its family (``vp`` also selects
    a diffusers model's discrete VP schedule)."""
    from pflatents.tasks.models.registry import native_sde
    from pflatents.tasks.ode.sde import make_sde

    native = native_sde(model_spec)
    if native is None:
        return make_sde(sde_name)
    if not explicit or sde_name == native.name or (sde_name == "vp" and native.name == "vp_discrete"):
        return native
    own = "vp" if native.name == "vp_discrete" else native.name
    raise InputError(f"the model {model_spec} was trained under the {native.name} SDE; --sde {sde_name} does "
                     f"not match it (use --sde {own}, or leave --sde out: a model runs under its own SDE)")


def job_sde(job: JobSettings):
    """The SDE ``job`` runs under (``choose_sde``): ``--sde`` counts as given only when it was set."""
    return choose_sde(job.sde, job.model, explicit="sde" in job.model_fields_set)


def solver_from_dict(d: dict):
    """Rebuild a SolverConfig from its ``to_dict`` form.

    Adaptive configs pinned before ``time_var`` existed integrated in s: they keep doing so; without
    ``control`` they used local error control."""
    from pflatents.tasks.ode.pfode import ADAPTIVE, SolverConfig

    d = dict(d)
    if d.get("name") in ADAPTIVE and "time_var" not in d:
        d["time_var"] = "s"
    if d.get("name") in ADAPTIVE:
        d.setdefault("control", "local")  # pinned before latent-unit control existed (or chosen local)
    return SolverConfig(**d)


def _latent_tol(job: JobSettings, scfg, pinned: Optional[dict[str, Any]]):
    """(solver config, pinned pilot record) for ``--latent-tol``: explicit solver flags win; a store that
    pinned a pilot for the same target and t_eps reuses its choice (or its pending record, with the same
    placeholder solver); otherwise the record is pending: the extract flow's pilot task runs the pilot
    before any shard and pins its choice (``pflatents.tasks.wrappers.pilot``). Nothing runs here."""
    from pflatents.tasks.ode.pilot import pending, pending_record

    explicit = sorted({"solver", "rtol", "atol", "steps"} & job.model_fields_set)
    if explicit:
        return scfg, {"target": job.latent_tol, "skipped": "explicit --" + ", --".join(explicit)}
    old = (pinned or {}).get("pilot") or {}
    if (old.get("target") == job.latent_tol and old.get("choice") and old["choice"].get("t_eps") == job.t_eps
            and not pending(old)):
        return solver_from_dict(old["choice"]), old
    return scfg, pending_record(job.latent_tol)


SOLVER_FLAGS = frozenset({"solver", "rtol", "atol", "steps", "grid", "t_eps", "control"})


def _store_solver(job: JobSettings, pinned: Optional[dict[str, Any]]) -> Optional[dict[str, Any]]:
    """The existing store's pinned solver when the job sets none of the solver settings (nor
    ``--latent-tol``): a store keeps the solver it was made with, as it keeps its shard size, so a store
    pinned under earlier defaults (t_eps 1e-5, tolerances 1e-5, local control) continues with the
    default flags. None without a store, with any solver flag, or when its solver is not readable."""
    if pinned is None or job.latent_tol is not None or SOLVER_FLAGS & job.model_fields_set:
        return None
    try:
        solver = _pinned_solver(pinned["solver"], pinned["sde"])
        solver_from_dict(solver)
    except (KeyError, TypeError, ValueError):  # InputError is a ValueError
        return None
    return solver


def _compile_mode(mode: str, kind: str, pinned: Optional[dict[str, Any]]) -> str:
    """The compile mode to pin: ``off`` for an exact gmm score (nothing to compile); ``auto`` on an
    existing store is the store's own mode (absent in stores pinned before the field existed: ``off``,
    they ran eager), so such a store continues with the default flags; an explicit on/off is kept (and
    refused by the store's config check where it differs)."""
    if _exact(kind):
        return "off"
    if mode == "auto" and pinned is not None and pinned.get("compile", "off") in ("auto", "on", "off"):
        return pinned.get("compile", "off")
    return mode


def _precision(job: JobSettings, kind: str, pinned: Optional[dict[str, Any]]) -> str:
    """The network precision to pin: the one asked for, else (for a network on a store pinned before the
    field existed) ``fp32``, what such stores ran, even at --dtype float64, else the state dtype's."""
    from pflatents.tasks.models.precision import resolve_precision

    if job.precision is None and not _exact(kind) and pinned is not None and "precision" not in pinned:
        return resolve_precision("fp32", job.dtype, kind)
    return resolve_precision(job.precision, job.dtype, kind)


def _class_label(job: JobSettings, pinned: Optional[dict[str, Any]]) -> Optional[int]:
    """The class label to pin: the one asked for, else the existing store's (a store keeps conditioning on the
    class it was made with, as it keeps its solver), else None (the source's labels)."""
    if job.class_label is not None:
        return job.class_label
    return (pinned or {}).get("class_label")


def _check_labels(model_spec: str, sde, source, class_label: Optional[int] = None) -> None:
    """A class-conditional model needs a label for every sample: refused up front when the source has none
    and no ``--class-label`` is given. ``--class-label K`` needs a conditional model with a class K."""
    from pflatents.tasks.models.registry import load_model

    model = load_model(model_spec, sde)
    if class_label is not None:
        if not model.conditional:
            raise InputError(f"--class-label {class_label}: the model {model_spec} is not class-conditional (it takes "
                             "no class label); drop --class-label")
        n = model.num_classes
        if class_label < 0 or (n is not None and class_label >= n):
            known = f"the model {model_spec} has {n} classes: 0 .. {n - 1}" if n is not None else "labels are >= 0"
            raise InputError(f"--class-label {class_label} is out of range: {known}")
        return
    if model.conditional and not source.has_labels:
        raise InputError(f"the model {model_spec} is class-conditional (a class label per sample) but the data "
                         f"{source.spec} has no labels; give a labelled source (imagefolder: class subfolders, a "
                         "webdataset cls key, a parquet label column) or --class-label K for all samples")


def build_config(job: JobSettings, *, source, shard_size: int, incremental: bool,
                 pinned: Optional[dict[str, Any]] = None) -> ExtractConfig:
    """Validate the job against the data and the model, and freeze it into one config.

    ``shard_size`` is the one chosen for the store (the job's, the existing store's, or the default)
    and ``incremental`` whether the job follows a growing source: then the data's length and
    fingerprint are not part of the pinned identity (the store keeps those of its planned prefix).
    The adaptive solver's time variable is pinned resolved: what the integration uses. ``pinned`` is
    the existing store's config, if any (``--latent-tol`` reuses its pilot's choice; without solver flags its
    solver is kept; ``--compile auto`` takes its mode; a store pinned before precision existed keeps
    fp32 by default).
    """
    from pflatents.tasks.models.registry import model_info
    from pflatents.tasks.ode.pfode import EPS_SOLVERS, SolverConfig, default_solver, default_tol

    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise InputError(f"shard size must be an integer >= 1; got {shard_size!r}")
    sde = job_sde(job)
    sde.check_t_eps(job.t_eps)
    info = model_info(job.model, sde)
    class_label = _class_label(job, pinned)
    _check_labels(job.model, sde, source, class_label)
    # latent-unit control pays where the encode map amplifies errors by up to sigma(T)/sigma(t_eps)
    # (learned models: gains of 50-500 measured); a gmm's covariance bounds its gain, and there local
    # control reached the same worst error with ~15 % fewer NFE (benchmarks/README.md, learned models)
    control = job.control or ("local" if _exact(info.kind) else "latent")
    name = job.solver or default_solver(_exact(info.kind), sde)
    tol = default_tol(name)
    scfg = SolverConfig(name=name, rtol=job.rtol if job.rtol is not None else tol,
                        atol=job.atol if job.atol is not None else tol, steps=job.steps, grid=job.grid,
                        t_eps=job.t_eps, control=control)
    if scfg.adaptive and scfg.time_var == "auto":  # adams4 and dpm23 always step in s
        scfg = dataclasses.replace(scfg, time_var="s" if name in EPS_SOLVERS else sde.preferred_time_var)
    kept = _store_solver(job, pinned)
    d = 1
    for n in source.sample_shape:
        d *= n
    if info.data_dim is not None and info.data_dim != d:
        raise InputError(f"sample shape {tuple(source.sample_shape)} ({d} values) does not match the model "
                         f"{info.spec} (dimension {info.data_dim})")
    if incremental:
        data = {"spec": source.spec, "incremental": True, "sample_shape": list(source.sample_shape),
                "dtype": str(source.dtype)}
    else:
        data = {"spec": source.spec, "fingerprint": source.fingerprint(), "n_samples": len(source),
                "sample_shape": list(source.sample_shape), "dtype": str(source.dtype)}
    data.update(source.pinned())  # options and class names of the kinds that have them; nothing for the others
    precision = _precision(job, info.kind, pinned)
    pilot = None
    if job.latent_tol is not None:
        scfg, pilot = _latent_tol(job, scfg, pinned)
    return ExtractConfig(data=data, model=info.to_dict(), sde=sde.to_dict(), solver=kept or scfg.to_dict(),
                         shard_size=shard_size, batch_size=job_batch_size(job, pinned), dtype=job.dtype, precision=precision,
                         compile=_compile_mode(job.compile, info.kind, pinned),
                         pilot=pilot, class_label=class_label)
