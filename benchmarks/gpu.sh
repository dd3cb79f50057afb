#!/usr/bin/env bash
# The GPU path end to end on one machine, from a fresh copy of the repository (benchmarks/cases/gpu.py
# says what it measures). Run from anywhere:
#
#   benchmarks/gpu.sh                      # one GPU: train a U-Net, extract (Prefect + Zarr), analyze
#   benchmarks/gpu.sh --device cpu --smoke # the same pipeline at tiny sizes on a CPU (the test suite)
#   benchmarks/gpu.sh --precision bf16 --compile on --solver rk4 --steps 32 --json out.json
#
# Needs python3 with torch. Packages the machine lacks (prefect, zarr, dask, ...) are installed from
# the wheels in .whl/ at the repository root if that folder exists (benchmarks/gpu_wheels.py builds it;
# benchmarks/README.md says how), into a temporary folder put first on PYTHONPATH. Without an install
# of pflatents, the repository itself is made importable as `pflatents` through a symlink. Without
# PREFECT_API_URL, one managed local Prefect server (`pflatents server start`) serves every command
# and is stopped at the end.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
py="${PYTHON:-python3}"
site="$(mktemp -d "${TMPDIR:-/tmp}/pfl-site.XXXXXX")"
started=""
cleanup() {
  if [ -n "$started" ]; then "$py" -c "$cli" server stop >/dev/null 2>&1 || true; fi
  rm -rf "$site"
}
trap cleanup EXIT
cli="import sys; from pflatents.flows.cli import entry; sys.argv[0] = 'pflatents'; entry()"
if [ -d "$repo/.whl" ] && ls "$repo"/.whl/*.whl >/dev/null 2>&1; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site/wheels" \
    "$repo"/.whl/*.whl
  export PYTHONPATH="$site/wheels${PYTHONPATH:+:$PYTHONPATH}"
fi
if ! "$py" -c "import pflatents.flows.cli" 2>/dev/null; then
  mkdir -p "$site/src" && ln -s "$repo" "$site/src/pflatents"
  export PYTHONPATH="$site/src${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1 OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
export PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1 PREFECT_LOGGING_LEVEL="${PREFECT_LOGGING_LEVEL:-WARNING}"
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="${PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS:-120}"
export PREFECT_HOME="${PREFECT_HOME:-$site/prefect}"
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi
"$py" -c "import torch, prefect, zarr, dask; print(f'torch {torch.__version__}, prefect {prefect.__version__}, zarr {zarr.__version__}, dask {dask.__version__}')"
if [ -z "${PREFECT_API_URL:-}" ]; then  # one managed Prefect server for train, extract and analyze
  "$py" -c "$cli" server start && started=1
fi
# the suite's `gpu` case (benchmarks/cases/gpu.py); it also writes benchmarks/out/gpu.md and gpu.json
"$py" -c 'import sys; sys.path.insert(0, sys.argv.pop(1)); from benchmarks.suite import main; sys.exit(main())' \
  "$repo" gpu "$@"
