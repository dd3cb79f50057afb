"""The direction of imports, read from the source: flows -> tasks -> storage, never upward.

Every module's imports are parsed with ``ast`` (imports inside functions too, since the project
imports heavy packages lazily), so a rule holds for code paths no test happens to run. Rules:

- storage imports neither tasks nor flows (nor prefect or torch); tasks never import flows;
- the ODE core (tasks/ode) imports neither prefect, zarr, dask nor storage; the statistics
  (tasks/analysis) neither prefect, zarr nor storage;
- among tasks, only the Prefect task wrappers (tasks/wrappers) import prefect or storage;
- the ODE core (tasks/ode) never imports the model adapters (tasks/models): both meet in the contracts
  module tasks/core, which imports nothing of the project but the errors;
- no module imports a name starting with ``_`` from another module;
- CLI command modules (flows/cli/*) import none of each other, only ``flows.cli.common``;
- light at import time: the data sources load zarr, PIL and scikit-learn, the models diffusers,
  and storage xarray only inside the functions that need them.

Also: pyproject's explicit ``packages`` list is exactly the folders that hold an ``__init__.py``.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("flows", "tasks", "storage")


@dataclass(frozen=True)
class Import:
    module: str       # the importing module, e.g. pflatents.tasks.ode.sde
    target: str       # the imported module, e.g. pflatents.storage or prefect.futures
    names: tuple      # names taken with `from target import ...`
    top_level: bool   # executed at import time (not inside a function)
    line: int


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"]
    return ".".join(["pflatents", *parts])


def source_files() -> list[Path]:
    files = [ROOT / "__init__.py"]
    for folder in FOLDERS:
        files += sorted((ROOT / folder).rglob("*.py"))
    return files


def imports_of(path: Path) -> list[Import]:
    module = module_name(path)
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[Import] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    found.append(Import(module, alias.name, (), not in_function, child.lineno))
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")[: len(package.split(".")) - (child.level - 1)]
                    base = ".".join([*anchor, base] if base else anchor)
                found.append(Import(module, base, tuple(a.name for a in child.names), not in_function, child.lineno))
            visit(child, inner)

    visit(tree, False)
    return found


ALL = [imp for f in source_files() for imp in imports_of(f)]


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _imports(imp: Import, prefix: str) -> bool:
    """``imp`` reaches ``prefix``: as its target, or as a submodule named in `from package import sub`."""
    return _under(imp.target, prefix) or any(_under(f"{imp.target}.{n}", prefix) for n in imp.names)


def violations(modules: str, forbidden: tuple[str, ...], top_level_only: bool = False,
               except_in: tuple[str, ...] = ()) -> list[str]:
    return [f"{i.module}:{i.line} imports {i.target} {list(i.names) or ''}".rstrip()
            for i in ALL
            if _under(i.module, modules) and not any(_under(i.module, e) for e in except_in)
            and (i.top_level or not top_level_only) and any(_imports(i, f) for f in forbidden)]


def test_the_parser_sees_imports_inside_functions():
    imps = imports_of(ROOT / "flows" / "cli" / "extract.py")
    assert any(i.target == "pflatents.flows.run" and not i.top_level for i in imps)
    assert any(i.target == "pflatents.flows.cli.common" and i.top_level for i in imps)
    assert len(ALL) > 200


@pytest.mark.parametrize("modules,forbidden", [
    ("pflatents.storage", ("pflatents.tasks", "pflatents.flows", "prefect", "torch")),
    ("pflatents.tasks", ("pflatents.flows",)),
    ("pflatents.tasks.ode", ("prefect", "zarr", "dask", "distributed", "pflatents.storage")),
    ("pflatents.tasks.analysis", ("prefect", "zarr", "pflatents.storage")),
])
def test_no_import_runs_upward(modules, forbidden):
    assert violations(modules, forbidden) == []


def test_the_ode_core_and_the_models_meet_only_in_the_contracts_module():
    assert violations("pflatents.tasks.ode", ("pflatents.tasks.models",)) == []
    core = [i for i in ALL if i.module == "pflatents.tasks.core" and _under(i.target, "pflatents")]
    assert [i.target for i in core] == ["pflatents.tasks.errors"]
    assert violations("pflatents.tasks.core", ("prefect", "zarr", "pflatents.storage", "pflatents.flows")) == []


def test_only_the_task_wrappers_import_prefect_or_storage():
    assert violations("pflatents.tasks", ("prefect", "pflatents.storage"), except_in=("pflatents.tasks.wrappers",)) == []


def test_no_private_names_imported_from_other_modules():
    bad = [f"{i.module}:{i.line} from {i.target} import {n}" for i in ALL for n in i.names
           if n.startswith("_") and i.target != "__future__" and i.target != i.module]
    assert bad == []


def test_cli_command_modules_import_only_common():
    cli = "pflatents.flows.cli"
    bad = [f"{i.module}:{i.line} imports {i.target}" for i in ALL
           if _under(i.module, cli) and i.module != cli
           and any(_imports(i, f"{cli}.{m.stem}") for m in (ROOT / "flows" / "cli").glob("*.py")
                   if m.stem not in ("__init__", "common"))]
    assert bad == []


@pytest.mark.parametrize("modules,heavy", [
    ("pflatents.tasks.data.sources", ("zarr", "prefect", "PIL", "sklearn")),
    ("pflatents.tasks.models", ("diffusers", "prefect", "zarr")),
    ("pflatents.tasks.training", ("prefect", "zarr")),
    ("pflatents.storage", ("xarray",)),
    ("pflatents.flows.cli", ("prefect", "torch", "zarr", "dask", "pflatents.tasks.ode", "pflatents.storage")),
])
def test_heavy_packages_load_only_when_needed(modules, heavy):
    assert violations(modules, heavy, top_level_only=True) == []


def test_pyproject_packages_are_the_folders_with_an_init():
    if sys.version_info >= (3, 11):
        import tomllib
    else:
        import tomli as tomllib
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = {"pflatents"} | {module_name(p) for folder in FOLDERS for p in (ROOT / folder).rglob("__init__.py")}
    assert listed == folders


# ---- kinds are chosen in their registries only ------------------------------------------------------

REGISTRIES = ("pflatents.tasks.data.registry", "pflatents.tasks.models.registry")
STRING_METHODS = {"startswith", "endswith", "removeprefix", "partition", "split", "find", "index"}


def _kind_strings() -> set[str]:
    from pflatents.tasks.data.registry import SOURCE_KINDS
    from pflatents.tasks.models.registry import MODEL_KINDS

    names = set(SOURCE_KINDS) | set(MODEL_KINDS)
    return names | {n + ":" for n in names}


def _strings(node: ast.AST) -> list[str]:
    """String constants in ``node`` itself or in a tuple/list/set literal it is."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return [s for e in node.elts for s in _strings(e)]
    return []


def kind_branches(path: Path, kinds: set[str]) -> list[str]:
    """Places that decide by a kind's name or prefix: a comparison with it, a string method given it
    (``startswith("images:")``), a loop over such literals, or a bare ``"name:"`` prefix literal."""
    module = module_name(path)
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        hits: list[str] = []
        if isinstance(node, ast.Compare):
            for part in [node.left, *node.comparators]:
                hits += [s for s in _strings(part) if s in kinds]
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in STRING_METHODS:
            hits += [s for a in node.args for s in _strings(a) if s in kinds]
        elif isinstance(node, ast.For):
            hits += [s for s in _strings(node.iter) if s in kinds and s.endswith(":")]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in kinds \
                and node.value.endswith(":"):
            hits.append(node.value)
        found += [f"{module}:{node.lineno} decides by {h!r}" for h in hits]
    return found


def test_the_branching_finder_sees_prefix_tests(tmp_path):
    sample = ROOT / "tasks" / "_kind_probe.py"
    code = ('def f(spec, kind):\n    if spec.startswith(("images:", "x")):\n        pass\n'
            '    if kind == "gmm":\n        pass\n    for p in ("npydir:",):\n        pass\n    return "a" == "b"\n')
    sample.write_text(code)
    try:
        hits = kind_branches(sample, {"images", "images:", "gmm", "npydir", "npydir:"})
    finally:
        sample.unlink()
    assert len([h for h in hits if "'images:'" in h]) >= 1 and any("'gmm'" in h for h in hits)
    assert any("'npydir:'" in h for h in hits)


def test_no_kind_branching_outside_the_registries():
    """A data or model kind is chosen in ``tasks/data/registry.py`` / ``tasks/models/registry.py`` only:
    adding a kind is one adapter module and one registry line, with no if-chain elsewhere to extend."""
    kinds = _kind_strings()
    bad = [hit for f in source_files() if module_name(f) not in REGISTRIES for hit in kind_branches(f, kinds)]
    assert bad == []
