"""Direction of imports: pure math imports neither Prefect nor zarr; storage imports neither tasks nor Prefect.

Each check imports the modules in a fresh interpreter and inspects sys.modules, so an indirect
import (through a helper module or a package __init__) is caught too.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PURE_MATH = ["pflatents.tasks.errors", "pflatents.tasks.ode.sde", "pflatents.tasks.models.scores", "pflatents.tasks.ode.solvers", "pflatents.tasks.ode.pfode"]


def imported_after(modules: list[str]) -> set[str]:
    """Top-level names in sys.modules after importing ``modules`` in a fresh interpreter."""
    code = (
        "import importlib, json, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules} | {m.split('.')[1] for m in sys.modules if m.startswith('pflatents.')})))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_pure_math_imports_neither_prefect_nor_zarr():
    loaded = imported_after(PURE_MATH)
    assert {"tasks", "torch", "numpy"} <= loaded  # the probe sees what was imported
    assert not {"prefect", "zarr", "storage", "flows"} & loaded


def storage_modules() -> list[str]:
    pkg = ROOT / "storage"
    return sorted(f"pflatents.storage.{p.stem}" for p in pkg.glob("*.py") if p.stem != "__init__")


def test_storage_imports_neither_tasks_nor_prefect():
    modules = storage_modules()
    if not modules:
        pytest.skip("storage/ has no modules yet")
    loaded = imported_after(modules)
    assert "storage" in loaded
    assert not {"tasks", "prefect", "flows"} & loaded
