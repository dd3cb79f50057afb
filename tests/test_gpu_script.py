"""benchmarks/gpu.sh in its CPU smoke mode: the whole GPU benchmark pipeline (train, network-only
limit, core-only loop, `pflatents extract` end to end, float64 reference, `pflatents analyze`) at
tiny sizes, as the GPU machine would run it (a symlinked package when pflatents is not installed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_gpu_benchmark_smoke_runs_end_to_end_on_cpu(tmp_path, cli_env):
    out = tmp_path / "gpu.json"
    env = {**cli_env, "PYTHON": sys.executable}  # the session's Prefect server: no temporary server per command
    r = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu.sh"), "--device", "cpu", "--smoke",
                        "--workdir", str(tmp_path / "work"), "--json", str(out)],
                       capture_output=True, text=True, env=env, timeout=880)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["device"] == "cpu" and res["train"]["steps"] >= 1
    assert res["network_only"]["sample_evals_per_s"] > 0 and res["network_only"]["compile"] == "eager"
    assert res["core_only"]["failed"] == 0 and res["core_only"]["mean_nfe"] == 16  # rk4, 4 steps
    assert res["extract"]["mean_nfe"] == 16 and res["extract"]["samples_per_s"] > 0
    le = res["latent_error"]
    assert 0 < le["p50"] <= le["p99"] <= le["max"] < 1.0 and le["reference_convergence"] < le["p50"]
    assert "| p99 latent error vs float64 |" in r.stdout
    store = tmp_path / "work" / "latents.zarr"
    assert store.is_dir()
    cfg = json.loads(subprocess.run([sys.executable, "-c", "import sys; from pflatents.flows.cli import entry; "
                                     "sys.argv[0] = 'pflatents'; entry()", "status", str(store), "--json"],
                                    capture_output=True, text=True, env=env).stdout)["config"]
    assert cfg["precision"] == "fp32" and cfg["compile"] == "auto"
