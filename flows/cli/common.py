"""Helpers every command module shares: exit codes, flags made from the settings models, store URLs.

Imports stay light at module level (argparse, and pydantic for the settings models): ``pflatents
--help`` must not import Prefect, torch or zarr; heavy imports belong inside the handlers.
"""

from __future__ import annotations

import argparse
import types
import typing
from typing import Any

from pflatents.flows.server import prefect_env

__all__ = ["EXIT_OK", "EXIT_FAILED", "EXIT_USAGE", "add_model_args", "flag_type", "model_values", "add_run_args", "run_settings",
           "store_url", "prefect_env"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def flag_type(annotation: Any) -> tuple[Any, list | None]:
    """(argparse type, choices) of a field annotation: int, float, str, Literal[...], Optional[...]."""
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        choices = list(typing.get_args(annotation))
        return type(choices[0]), choices
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(annotation) if a is not type(None)]
        return flag_type(inner[0])
    return annotation, None


def add_model_args(p: argparse.ArgumentParser, model: Any, required: bool = True, skip: tuple[str, ...] = ()) -> None:
    """One flag ``--field-name`` per field of the pydantic ``model`` (its description is the help).

    Flags default to None ("not given"): the model supplies the defaults (``model_values``), and a
    serve job file's values are kept where a flag is not given. Booleans are ``store_true`` flags.
    With ``required`` the model's required fields are required flags."""
    for name, f in model.model_fields.items():
        if name in skip:
            continue
        flag = "--" + name.replace("_", "-")
        default = "" if f.is_required() or f.default is None else f" (default {f.default})"
        help_ = (f.description or "") + default
        if f.annotation is bool:
            p.add_argument(flag, action="store_true", default=None, help=f.description)
            continue
        kind, choices = flag_type(f.annotation)
        p.add_argument(flag, type=kind, choices=choices, default=None, help=help_,
                       required=required and f.is_required())


def model_values(a: argparse.Namespace, model: Any) -> dict[str, Any]:
    """The given flags (not None) that name fields of ``model``."""
    return {k: getattr(a, k) for k in model.model_fields if getattr(a, k, None) is not None}


def add_run_args(p: argparse.ArgumentParser, progress: bool = True) -> None:
    """Flags that say how to run (the RunSettings fields), never what is computed."""
    from pflatents.flows.run import RunSettings

    add_model_args(p, RunSettings)
    if progress:
        p.add_argument("--no-progress", action="store_true", help="no progress bar (the bar is on stderr)")
    p.add_argument("--json", action="store_true", help="print the outcome as JSON (and nothing else on stdout)")


def run_settings(a: argparse.Namespace):
    """The RunSettings named by the run flags (values validated; runner and device not yet checked)."""
    from pflatents.flows.run import RunSettings

    return RunSettings.from_dict(model_values(a, RunSettings))


def store_url(path: str) -> str:
    """A local path made absolute; an fsspec URL (``s3://...``) as given."""
    from pflatents.flows.coordinator import store_url as _url

    return _url(path)
