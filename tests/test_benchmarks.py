"""The benchmark suite's entry point (benchmarks/suite.py), run as `python -m benchmarks` in a subprocess:
`--list` names every case module, an unknown case is refused by name, and a case's `--quick` run writes
its Markdown and a JSON record naming the command, the commit and the machine, with what it measured.

The fast cases run here on every `make test-fast`; a few slower ones are marked slow. The cases that start
Prefect servers, dask clusters or browsers are not run here (benchmarks/README.md has their commands;
tests/test_gpu_script.py runs the `gpu` case through benchmarks/gpu.sh)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CASES = REPO / "benchmarks" / "cases"


def bench(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "benchmarks", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def quick(case: str, tmp_path: Path, *extra: str, timeout: float = 600) -> tuple[str, dict]:
    """Run CASE --quick into tmp_path; check the two files every run writes and return them."""
    r = bench(case, "--quick", "--out", str(tmp_path), *extra, timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    md = (tmp_path / f"{case}.md").read_text()
    rec = json.loads((tmp_path / f"{case}.json").read_text())
    command = " ".join(["python -m benchmarks", case, "--quick", *extra])
    assert md.splitlines()[0] == f"<!-- {command} -->"
    assert "|---" in md  # a Markdown table
    assert md.split("\n", 2)[2].strip() in r.stdout  # the .md holds what the case printed
    assert rec["case"] == case and rec["command"] == command and rec["quick"] is True
    assert rec["argv"][-len(extra) or len(rec["argv"]):] == list(extra)  # options after --quick come last (win)
    git = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    if git.returncode == 0:
        assert rec["git"]["commit"] == git.stdout.strip()
    assert rec["machine"]["cpus"] == os.cpu_count() and rec["wall_s"] > 0
    assert len(rec["load_average"]["start"]) == 3
    assert not list(tmp_path.glob("*.tmp"))
    return md, rec


def test_list_names_every_case_module_once_with_what_it_measures():
    r = bench("--list")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    listed = [line.split()[0] for line in lines]
    modules = sorted(p.stem for p in CASES.glob("*.py") if p.stem != "__init__")
    assert sorted(listed) == modules and len(set(listed)) == len(listed)
    for line in lines:
        assert len(line.split(None, 1)[1]) > 30, line  # the first sentence of the case's docstring


def test_unknown_case_is_refused_by_name_and_nothing_is_written(tmp_path):
    r = bench("solver", "--quick", "--out", str(tmp_path))
    assert r.returncode != 0
    assert "unknown case 'solver'" in r.stderr and "solvers" in r.stderr and "--list" in r.stderr
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


def test_case_help_is_the_case_own(tmp_path):
    r = bench("gmm_defaults", "--help")
    assert r.returncode == 0 and "python -m benchmarks gmm_defaults" in r.stdout and "--n" in r.stdout


@pytest.mark.slow  # ~8-19 s: outside make test-fast's ~2 min, still in make test
def test_gmm_defaults_quick_measures_the_ladder_and_options_after_quick_win(tmp_path):
    md, rec = quick("gmm_defaults", tmp_path, "--n", "64")
    res = rec["result"]
    assert res["n"] == 64  # --n 64 given after --quick overrides the quick version's --n 128
    rows = {(r["setting"].split(" (")[0], r["t_eps"]): r for r in res["rows"]}
    assert len(res["rows"]) == 13 and md.count("| dopri5 ") + md.count("| old default") == 13
    # the network default on the GMM: p99 latent error against the float64 reference well under 1e-4
    assert rows[("dopri5 latent, tol 1e-06", 1e-4)]["p99"] < 1e-4
    for control in ("local", "latent"):  # a tighter tolerance costs more evaluations and errs less
        nfe = [rows[(f"dopri5 {control}, tol {t:g}", 1e-4)]["nfe_mean"] for t in (1e-5, 1e-6, 1e-7)]
        p99 = [rows[(f"dopri5 {control}, tol {t:g}", 1e-4)]["p99"] for t in (1e-5, 1e-6, 1e-7)]
        assert nfe[0] < nfe[1] < nfe[2] and p99[0] > p99[2]


def test_lock_fence_quick(tmp_path):
    md, rec = quick("lock_fence", tmp_path)
    res = rec["result"]
    assert len(res["fenced_mb_s"]) == len(res["unfenced_mb_s"]) == 1 and min(res["fenced_mb_s"]) > 0
    assert 0 < res["check_us"] < 1e6 and 0 < res["acquire_release_us"] < 1e7
    assert md.count("\n| ") == 5  # header + 4 rows


def test_sources_quick_reads_every_image_of_each_kind(tmp_path):
    md, rec = quick("sources", tmp_path)
    assert [r["source"] for r in rec["result"]] == ["imagefolder", "wds", "parquet"]
    assert all(r["n"] == 40 and r["scan_per_s"] > 0 for r in rec["result"])


@pytest.mark.slow  # ~8-19 s: outside make test-fast's ~2 min, still in make test
def test_solver_audit_quick(tmp_path):
    md, rec = quick("solver_audit", tmp_path)
    nfe = rec["result"]["nfe_at_1e-4"]
    assert set(nfe) == {"t", "s"} and all(v is not None and 20 < v < 1000 for v in nfe.values())
    assert "Per-step audit" in md and "carried to T" in md


def test_calibration_quick_counts_no_false_alarm_on_full_rank_bijections(tmp_path):
    md, rec = quick("calibration", tmp_path)
    nulls = rec["result"]["nulls"]
    assert nulls and all(r["case"].startswith("bijection") for r in nulls)
    assert all(r["rate"] == 0 and r["runs"] == 2 for r in nulls)  # the rank rule cannot fire on full rank


@pytest.mark.slow
def test_solvers_quick_reaches_the_target_with_every_method(tmp_path):
    md, rec = quick("solvers", tmp_path)
    res = rec["result"]
    assert res["config"]["n"] == 256 and res["reference"]["check_max_abs_diff"] < 1e-6
    for key in ("ours/float32", "ours/float64", "tdq/float64"):
        assert res["cheapest"][key]["err_max"] <= res["target"]


@pytest.mark.slow
def test_digits_quality_quick_reconstructs_every_digit(tmp_path):
    md, rec = quick("digits_quality", tmp_path)
    (row,) = rec["result"]["rows"]
    assert row["steps"] == 20 and row["requantised_exact"] == "1797/1797" and row["failed"] == 0
    assert (tmp_path / "digits_quality").is_dir()  # the decoded-draw PNGs go under --out


def test_geometry_offsets_read_a_crossing_off_each_shifted_ladder(monkeypatch):
    """`geometry --offsets K`: K half-decade ladders, ladder j shifted j/(2K) decade; each method's crossing
    of p99 1e-3 / 1e-4 is read off each ladder (log-log between its rungs) and reported as the median,
    its range, and the median's ratio to torchdiffeq's crossing (synthetic rows with known crossings)."""
    monkeypatch.syspath_prepend(str(REPO))
    from benchmarks.cases import geometry as G

    lad = G.ladder_set(1e-4, 1e-3, 4)
    assert len(lad) == 12 and [t for t, _ in lad] == sorted((t for t, _ in lad), reverse=True)
    for j in range(4):
        tols = [t for t, i in lad if i == j]
        assert tols[0] == pytest.approx(10 ** (-3 - j / 8)) and len(tols) == 3
        assert all(a / b == pytest.approx(10 ** 0.5) for a, b in zip(tols, tols[1:]))
    row = {"model": "m", "dtype": "float32"}
    rows = [{**row, "method": "torchdiffeq dopri5", "nfe": 100.0, "p99": 1e-2},
            {**row, "method": "torchdiffeq dopri5", "nfe": 1000.0, "p99": 1e-4}]
    for j, a in enumerate((10.0, 13.0, 11.0, 12.0)):  # crossings at 1e-4: 10 a (100, 130, 110, 120)
        rows += [{**row, "method": "x", "ladder": j, "nfe": a, "p99": 1e-2},
                 {**row, "method": "x", "ladder": j, "nfe": 10 * a, "p99": 1e-4}]
    out = G.offsets_table(rows).splitlines()
    assert len(out) == 3 and out[2].startswith("| m | float32 | x | 4 |")
    cells = [c.strip() for c in out[2].split("|")[5:-1]]
    assert cells == ["36 (32-41)", "0.115", "115 (100-130)", "0.115", "0.100 0.130 0.110 0.120"], cells
