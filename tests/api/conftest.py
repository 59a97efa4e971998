"""Fixtures of the API tests: CEL evaluation of CRD rules with cel-python."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import celpy
import pytest

_ENV = celpy.Environment()
_PROGRAMS: dict[str, Any] = {}


def _program(rule: str) -> Any:
    if rule not in _PROGRAMS:
        _PROGRAMS[rule] = _ENV.program(_ENV.compile(rule))
    return _PROGRAMS[rule]


def apply_defaults(schema: dict[str, Any], obj: Any) -> Any:
    """Structural defaulting as the API server does it before validation: missing properties
    with a ``default`` are filled in, inside objects that exist."""
    if isinstance(obj, dict):
        out = dict(obj)
        for key, sub in schema.get("properties", {}).items():
            if key not in out and "default" in sub:
                out[key] = sub["default"]
            if key in out:
                out[key] = apply_defaults(sub, out[key])
        return out
    if isinstance(obj, list) and isinstance(schema.get("items"), dict):
        return [apply_defaults(schema["items"], item) for item in obj]
    return obj


def failed_rules(schema: dict[str, Any], obj: Any, old: Any = None, path: str = "") -> list[tuple[str, str]]:
    """(path, message) of every rule that is false on ``obj`` after defaulting (transition rules need ``old``)."""
    if not path:
        obj = apply_defaults(schema, obj)
        old = apply_defaults(schema, old) if old is not None else None
    failures: list[tuple[str, str]] = []
    for rule in schema.get("x-kubernetes-validations", []):
        uses_old = "oldSelf" in rule["rule"]
        if uses_old and old is None:
            continue
        activation = {"self": celpy.json_to_cel(obj)}
        if uses_old:
            activation["oldSelf"] = celpy.json_to_cel(old)
        result = _program(rule["rule"]).evaluate(activation)
        if isinstance(result, celpy.CELEvalError):
            raise AssertionError(f"{path}: rule {rule['rule']!r} failed to evaluate: {result}")
        if not bool(result):
            failures.append((path, rule["message"]))
    if isinstance(obj, dict):
        for key, sub in schema.get("properties", {}).items():
            if key in obj:
                old_sub = old.get(key) if isinstance(old, dict) else None
                failures += failed_rules(sub, obj[key], old_sub, f"{path}.{key}")
    if isinstance(obj, list) and "items" in schema:
        for i, item in enumerate(obj):
            failures += failed_rules(schema["items"], item, None, f"{path}[{i}]")
    return failures


@pytest.fixture
def cel_failures() -> Callable[..., list[tuple[str, str]]]:
    return failed_rules
