"""A Prefect flow whose start costs less: ``JsonFlow`` (``json_flow`` decorates like ``prefect.flow``).

Prefect sends a flow run's parameters to its API through FastAPI's ``jsonable_encoder``; importing
FastAPI for it took ~0.15 s of every command (the largest item of a flow run's start after Prefect's
own import, benchmarks/README.md, "The Prefect server's lifecycle"). Parameters that already are plain
JSON (None, bool, int, float, str, and lists, tuples and str-keyed dicts of them: what pflatents' flows
take) are sent as they are, with tuples as lists, which is what the encoder makes of them; anything
else goes through Prefect's own ``serialize_parameters``.

A flow that persists no results (``persist_result=False``) gets Prefect's local result path as its
result storage when it runs, so that its flow and task runs do not ask the server for a default
storage they never write to (one API request each).
"""

from __future__ import annotations

from typing import Any

from prefect import Flow  # (through prefect.main: Prefect's set-up, as `from prefect import flow`)

__all__ = ["JsonFlow", "json_flow", "plain_json"]

_SCALARS = (type(None), bool, int, float, str)


def plain_json(value: Any, depth: int = 0) -> bool:
    """Whether ``value`` is plain JSON (exact built-in types only: no subclasses such as enums)."""
    if type(value) in _SCALARS:
        return True
    if depth > 32:
        return False
    if type(value) in (list, tuple):
        return all(plain_json(v, depth + 1) for v in value)
    if type(value) is dict:
        return all(type(k) is str and plain_json(v, depth + 1) for k, v in value.items())
    return False


def _as_json(value: Any) -> Any:
    if type(value) in (list, tuple):
        return [_as_json(v) for v in value]
    if type(value) is dict:
        return {k: _as_json(v) for k, v in value.items()}
    return value


class JsonFlow(Flow):
    """``prefect.flows.Flow`` that serializes plain-JSON parameters without importing FastAPI."""

    def serialize_parameters(self, parameters: dict[str, Any]) -> dict[str, Any]:
        if all(plain_json(v) for v in parameters.values()):
            return {k: _as_json(v) for k, v in parameters.items()}
        return super().serialize_parameters(parameters)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # A flow that persists no results still builds a result store, whose default storage Prefect
        # asks the server for (GET /api/admin/storage, once for the flow run and once per task
        # run: ~0.1-0.2 s of a trivial extract). Nothing is ever written there, so give it Prefect's
        # local default path (what it uses when the server names no default block) up front.
        if self.persist_result is False and self.result_storage is None:
            from pathlib import Path

            from prefect.settings import get_current_settings

            self.result_storage = Path(get_current_settings().results.local_storage_path)
        return super().__call__(*args, **kwargs)

    def with_options(self, **options: Any) -> "JsonFlow":
        new = super().with_options(**options)  # Prefect builds a plain Flow: keep this class
        new.__class__ = type(self)
        return new


def json_flow(**options: Any):
    """Like ``@prefect.flow(**options)``, making a ``JsonFlow``."""

    def decorate(fn):
        return JsonFlow(fn, **options)

    return decorate
