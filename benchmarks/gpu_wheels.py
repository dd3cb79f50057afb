"""Build .whl/: the wheels a GPU machine without a package registry needs to run pflatents end to end.

    .venv/bin/python benchmarks/gpu_wheels.py --list      # what would be fetched (no network)
    .venv/bin/python benchmarks/gpu_wheels.py             # pip download them into .whl/ (Python 3.12, x86-64)

The set is the dependency closure of pflatents' pipeline packages (prefect, prefect-dask, zarr,
dask, distributed, google-crc32c) as installed in this environment (so the versions are the ones
the test suite ran with), evaluated for CPython 3.12 on Linux, minus the packages the GPU image
already has (``IMAGE``, the package list of the 'cuda' image as read on 2026-11-17) and minus
``SKIP`` (server back ends the pipeline never loads). Each is fetched with ``pip download --no-deps
--only-binary=:all:`` for manylinux x86-64; ``gpu.sh`` installs whatever lies in .whl/ with
``pip install --no-index --no-deps --target`` and puts it first on PYTHONPATH.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import subprocess
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOTS = ("prefect", "prefect-dask", "zarr", "dask", "distributed", "google-crc32c")
SKIP = {"asyncpg"}  # Postgres driver of the Prefect server; the pipeline's temporary server uses SQLite
IMAGE = set(map(canonicalize_name, """absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio
attrs botorch build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings
cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub
humanize hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2
joblib kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py
markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind
narwhals networkx ninja numba numba-cuda numpy numpyro nvidia-ml-py onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft
pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments
pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist
python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers
statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers
toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope triton typer
typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp""".split()))
ENV = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux", "platform_system": "Linux",
       "platform_machine": "x86_64", "implementation_name": "cpython", "platform_python_implementation": "CPython",
       "os_name": "posix", "extra": ""}
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64", "manylinux_2_34_x86_64", "manylinux_2_31_x86_64")


def closure() -> dict[str, str]:
    """name -> installed version of every package the roots need on CPython 3.12 Linux, less IMAGE and SKIP."""
    seen: dict[str, str | None] = {}
    stack = list(ROOTS)
    while stack:
        name = canonicalize_name(stack.pop())
        if name in seen:
            continue
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            seen[name] = None
            continue
        seen[name] = dist.version
        for r in dist.requires or []:
            req = Requirement(r)
            if req.marker is None or req.marker.evaluate(ENV):
                stack.append(req.name)
    missing = sorted(n for n, v in seen.items() if v is None and n not in IMAGE)
    if missing:
        sys.exit(f"not installed here, so no version to pin: {', '.join(missing)}")
    return {n: v for n, v in sorted(seen.items()) if n not in IMAGE and n not in SKIP and v is not None}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--list", action="store_true", help="print NAME==VERSION and stop (no network)")
    ap.add_argument("--dest", default=str(Path(__file__).resolve().parents[1] / ".whl"))
    a = ap.parse_args()
    pins = closure()
    if a.list:
        print("\n".join(f"{n}=={v}" for n, v in pins.items()))
        print(f"{len(pins)} packages", file=sys.stderr)
        return
    dest = Path(a.dest)
    dest.mkdir(exist_ok=True)
    plat = [x for p in PLATFORMS for x in ("--platform", p)]
    for n, v in pins.items():
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                        "--python-version", "3.12", "--implementation", "cp", *plat, "--platform", "any",
                        "-d", str(dest), f"{n}=={v}"], check=True)
    total = sum(f.stat().st_size for f in dest.glob("*.whl"))
    print(f"{len(pins)} wheels, {total / 2**20:.1f} MiB in {dest}")


if __name__ == "__main__":
    main()
