"""Network precision and compilation settings: what they mean, how they resolve, and the torch flags.

Precision says how a *network* is evaluated; the ODE state keeps its own dtype (``--dtype``) and the
schedule math stays float64 whatever is chosen:

- ``fp32``: weights and activations in IEEE float32; TF32 is switched **off** for cuDNN convolutions
  and for matmuls before every call on a GPU (torch leaves cuDNN's TF32 on by default, which put
  ~1e-3 relative noise into a U-Net's output and tripled an adaptive solver's step count);
- ``tf32``: float32 weights, TF32 tensor-core convolutions and matmuls on a GPU; on a CPU it is the
  same computation as ``fp32`` (no TF32 there);
- ``bf16``: float32 weights, the network run under ``torch.autocast(dtype=bfloat16)`` (convolutions
  and matmuls in bfloat16 with float32 accumulation; the rest float32); works on CPU and GPU;
- ``fp64``: the weights cast to float64 and the network evaluated in float64.

Reduced-precision reductions in bf16/fp16 matmuls are switched off on a GPU for every precision.
The flags are process-wide torch settings; they are set before each network call, so the last
caller wins: one process runs one extraction's precision at a time.

Compilation (``auto | on | off``): ``torch.compile`` of the network; on a GPU a convolutional network
is also put in channels_last memory format. ``auto`` compiles on a GPU and never on a CPU, where a
compile took 100-120 s on the project's 2-core VM for a speed-up of at most 1.75x (a slow-down of
the small U-Net at batch 256; benchmarks/README.md), longer than small jobs run. Compilation
reorders floating-point operations, so it changes latents at the level of the network's rounding
(at most 5e-5 measured, float32, rk4 16 steps); like the
precision it is pinned in the store's config (``ExtractConfig.compile``), and a store continues only
with the same mode.
"""

from __future__ import annotations

import contextlib

import torch

from pflatents.tasks.errors import InputError

__all__ = ["PRECISIONS", "COMPILE_MODES", "check_precision", "check_compile", "resolve_precision",
           "compute_dtype", "set_matmul_flags", "matmul_flags", "autocast", "use_compile", "ANALYTIC_PRECISION"]

PRECISIONS = ("fp32", "tf32", "bf16", "fp64")
COMPILE_MODES = ("auto", "on", "off")
# An exact (analytic) score has no network: it is evaluated in the ODE state's dtype.
ANALYTIC_PRECISION = {"float32": "fp32", "float64": "fp64"}


def check_precision(precision: str | None) -> str | None:
    """``precision`` if it is one of PRECISIONS (or None: the module's own dtype); else a clear error."""
    if precision is not None and precision not in PRECISIONS:
        raise InputError(f"unknown network precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    return precision


def check_compile(mode: str) -> str:
    """``mode`` if it is one of COMPILE_MODES; else a clear error."""
    if mode not in COMPILE_MODES:
        raise InputError(f"unknown compile mode {mode!r}; choose one of {', '.join(COMPILE_MODES)}")
    return mode


def resolve_precision(precision: str | None, dtype: str, kind: str = "ckpt") -> str:
    """The precision to pin: the one asked for, else ``fp64`` for a float64 state and ``fp32`` otherwise.

    ``kind`` is the model kind (an exact score, such as ``gmm``, runs in the state's dtype, so only the
    precision matching ``dtype`` is accepted for it: ``ModelKind.exact``).
    """
    from pflatents.tasks.models.registry import exact_kind

    check_precision(precision)
    if dtype not in ANALYTIC_PRECISION:
        raise InputError(f"dtype must be float32 or float64; got {dtype!r}")
    default = ANALYTIC_PRECISION[dtype]
    if precision is None or precision == "auto":
        return default
    if exact_kind(kind) and precision != default:
        raise InputError(f"--precision {precision} applies to networks; a {kind} model is an exact score computed "
                         f"in the ODE state's dtype ({dtype}, i.e. --precision {default}); use --dtype "
                         f"{'float64' if precision == 'fp64' else 'float32'} to change it")
    return precision


def compute_dtype(precision: str | None, module_dtype: torch.dtype = torch.float32) -> torch.dtype:
    """The dtype weights and inputs are cast to: float64 for fp64, float32 for the others, the module's
    own dtype for None."""
    if precision is None:
        return module_dtype
    return torch.float64 if precision == "fp64" else torch.float32


def set_matmul_flags(precision: str | None, device: torch.device) -> None:
    """On a GPU: TF32 on only for ``tf32``; reduced-precision bf16/fp16 reductions off. No-op on CPU."""
    if device.type != "cuda":
        return
    tf32 = precision == "tf32"
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False


_FLAGS = ((torch.backends.cudnn, "allow_tf32"), (torch.backends.cuda.matmul, "allow_tf32"),
          (torch.backends.cuda.matmul, "allow_bf16_reduced_precision_reduction"),
          (torch.backends.cuda.matmul, "allow_fp16_reduced_precision_reduction"))


@contextlib.contextmanager
def matmul_flags(precision: str | None, device: torch.device):
    """``set_matmul_flags`` for the block only: the process's flags are put back after it (library code
    leaves process-global torch settings as it found them). No-op on CPU."""
    if device.type != "cuda":
        yield
        return
    saved = [getattr(obj, name) for obj, name in _FLAGS]
    set_matmul_flags(precision, device)
    try:
        yield
    finally:
        for (obj, name), v in zip(_FLAGS, saved):
            setattr(obj, name, v)


def autocast(precision: str | None, device: torch.device):
    """``torch.autocast(bfloat16)`` for ``bf16``, else a no-op context."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def use_compile(mode: str, device: torch.device) -> bool:
    """Whether to compile: ``on``/``off`` as said; ``auto`` compiles on a GPU only."""
    check_compile(mode)
    if mode == "auto":
        return device.type == "cuda"
    return mode == "on"
