"""The benchmark suite's entry point: named cases, each writing its Markdown and a JSON record.

    python -m benchmarks --list                       # the cases, one line each
    python -m benchmarks CASE [--quick] [--out DIR] [CASE'S OWN OPTIONS ...]
    python -m benchmarks CASE --help                  # the case's own options
    python -m benchmarks CASE [RUNNER OPTIONS] -- ARGS  # everything after -- goes to the case as is

A case is a module of benchmarks/cases with ``main(argv) -> result``: it prints its Markdown tables to
stdout (progress goes to stderr) and returns what it measured (JSON-able, or None). The runner runs it
with the options given after CASE (``--quick`` adds the case's small version below, run in seconds to a
couple of minutes; options given after it win), keeps a copy of stdout and writes, under ``--out``
(default benchmarks/out/):

- ``CASE.md``: a line naming the command, date, commit, machine and load average, then the Markdown;
- ``CASE.json``: ``{case, command, argv, quick, started, finished, wall_s, git, machine, load_average,
  result}``.

Figures in benchmarks/README.md name the command that made them.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.common import report

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"


@dataclass(frozen=True)
class Case:
    quick: tuple[str, ...]  # options of the small version ("{out}" is replaced by the --out directory)
    needs: str = ""  # what the case needs beyond the venv (said by --list)


# name -> how to run it; the module is benchmarks/cases/NAME.py and its docstring's first line describes it
CASES: dict[str, Case] = {
    # solvers and models
    "solvers": Case(("--small", "--n", "256")),
    "solver_audit": Case(("--n", "64", "--vars", "t,s", "--audit-tol", "1e-3")),
    "gmm_defaults": Case(("--n", "128")),
    "learned": Case(("--models", "digits", "--t-eps", "1e-3", "--dtypes", "float32", "--n", "16", "--half-ladder",
                     "--methods", "ours dopri5 latent,rk4 logsnr,torchdiffeq dopri5")),
    "latent_tol": Case(("--models", "", "--gmm", "--targets", "1e-3")),
    "geometry": Case(("--models", "gmm", "--n-gmm", "128", "--decades", "--methods", "adams4,dopri5 t")),
    "learned_teps": Case(("--models", "digits", "--t-eps", "1e-3", "--n", "16")),
    "precision": Case(("--n", "16", "--models", "digits", "--solvers", "rk4 64", "--no-ref")),
    "digits_quality": Case(("--budgets", "20", "--draws", "8", "--workdir", "{out}/digits_quality")),
    # pipeline, orchestration and storage
    "extract_overhead": Case(("--n", "4000", "--steps", "2", "--repeats", "1")),
    "server_lifecycle": Case(("--repeats", "1", "--skip-big")),
    "extract_phases": Case(("--repeats", "1")),
    "task_groups": Case(("--n", "2000", "--shard", "250", "--batch", "250", "--steps", "2", "--repeats", "1")),
    "scaleout": Case(("--n", "4000", "--workers", "1", "--steps", "2")),
    "lock_fence": Case(("--rows", "20000", "--repeats", "1")),
    "sources": Case(("--n", "40", "--size", "64", "--res", "32")),
    # analysis
    "analysis": Case(("--rows", "20000", "--scale", "1", "--skip-numpy", "--skip-cli")),
    "analysis_cases": Case(("--cases", "patches", "--patches", "1000", "--train-steps", "30",
                            "--workdir", "{out}/analysis_cases")),
    "calibration": Case(("--runs", "2", "--power-runs", "1", "--jobs", "1", "--only", "bijection")),
    # GPU and browser
    "gpu": Case(("--device", "cpu", "--smoke"), needs="a CUDA GPU (or --device cpu); benchmarks/gpu.sh wraps it"),
    "dashboard": Case(("--samples", "4000", "--png", "{out}/dashboard.png"), needs="Chromium (Debian: chromium)"),
}


def describe(name: str) -> str:
    """The first line of the case module's docstring (read without importing the module)."""
    doc = ast.get_docstring(ast.parse((HERE / "cases" / f"{name}.py").read_text()))
    return " ".join((doc or "").strip().split("\n\n")[0].split())


def listing() -> str:
    width = max(map(len, CASES))
    lines = []
    for name, case in CASES.items():
        need = f" [needs {case.needs}]" if case.needs else ""
        lines.append(f"{name:<{width}}  {describe(name)}{need}")
    return "\n".join(lines)


def run_case(name: str, argv: list[str], quick: bool = False, out: Path = OUT) -> tuple[Path, Path, object]:
    """Run one case and write out/NAME.md and out/NAME.json; returns their paths and the case's result."""
    if name not in CASES:
        raise SystemExit(f"benchmarks: unknown case {name!r}; the cases are: {', '.join(CASES)} "
                         "(python -m benchmarks --list says what each measures)")
    out = Path(out).resolve()
    full = [a.replace("{out}", str(out)) for a in CASES[name].quick] + list(argv) if quick else list(argv)
    mod = importlib.import_module(f"benchmarks.cases.{name}")
    started, load0, t0 = report.now(), report.load_average(), time.perf_counter()
    tee = report.Tee(sys.stdout)
    with contextlib.redirect_stdout(tee):
        result = mod.main(full)
    tee.flush()
    record = {"case": name, "command": report.command(name, (["--quick"] if quick else []) + list(argv)),
              "argv": full, "quick": quick, "started": started, "finished": report.now(),
              "wall_s": time.perf_counter() - t0, "git": report.git_commit(), "machine": report.machine(),
              "load_average": {"start": load0, "end": report.load_average()}, "result": result}
    md, js = report.write_outputs(out, name, tee.copy.getvalue(), record)
    print(f"wrote {md} and {js}", file=sys.stderr)
    return md, js, result


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    verbatim = []
    if "--" in argv:
        i = argv.index("--")
        argv, verbatim = argv[:i], argv[i + 1:]
    ap = argparse.ArgumentParser(prog="python -m benchmarks", allow_abbrev=False, add_help=False,
                                 description=__doc__.split("\n\n")[0],
                                 epilog="Options after CASE that the runner does not take go to the case.")
    ap.add_argument("--list", action="store_true", help="list the cases and what each measures")
    ap.add_argument("--quick", action="store_true", help="the case's small version (seconds to a couple of minutes)")
    ap.add_argument("--out", type=Path, default=OUT, help="where CASE.md and CASE.json go (default benchmarks/out)")
    ap.add_argument("-h", "--help", action="store_true")
    ap.add_argument("case", nargs="?")
    known, rest = ap.parse_known_args(argv)
    rest += verbatim
    if known.list:
        print(listing())
        return 0
    if known.case is None:
        ap.print_help()
        print("\ncases:\n" + listing())
        return 0 if known.help else 2
    if known.help:
        rest = ["--help", *rest]
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spinning OpenMP threads slow shared cores 20-50x
    run_case(known.case, rest, quick=known.quick, out=known.out)
    return 0
