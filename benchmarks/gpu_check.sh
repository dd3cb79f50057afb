#!/usr/bin/env bash
# Run on a machine with an NVIDIA GPU, from the repo root: the CUDA path of the pure-torch core and its
# throughput, with GPU utilisation sampled by nvidia-smi while it runs. Needs torch (CUDA) only.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader,nounits -lms 200 > /tmp/gpu_util.csv &
smi=$!
trap 'kill $smi 2>/dev/null || true' EXIT
python3 benchmarks/gpu_check.py "$@"
kill $smi 2>/dev/null || true
python3 - <<'PY'
rows = [l.split(",") for l in open("/tmp/gpu_util.csv") if l.strip()]
util = [float(r[0]) for r in rows]
busy = [u for u in util if u > 0]
print(f"GPU utilisation while running: mean {sum(util)/max(1,len(util)):.0f}% over {len(util)} samples; "
      f"mean when busy {sum(busy)/max(1,len(busy)):.0f}%; peak memory used {max(float(r[1]) for r in rows):.0f} MiB")
PY
