"""What the API server does with a CRD's schema before storing an object: structural defaulting
and the CEL rules (`x-kubernetes-validations`), evaluated with cel-python (`celpy`)."""

from __future__ import annotations

import copy
from typing import Any

import celpy


def apply_defaults(schema: dict[str, Any], value: Any) -> Any:
    """Fill in `default`s of absent properties, recursively (as the API server does)."""
    value = copy.deepcopy(value)
    if isinstance(value, dict):
        for name, child in (schema.get("properties") or {}).items():
            if name not in value and "default" in child:
                value[name] = copy.deepcopy(child["default"])
            if name in value:
                value[name] = apply_defaults(child, value[name])
    elif isinstance(value, list) and "items" in schema:
        value = [apply_defaults(schema["items"], item) for item in value]
    return value


def rule_failures(schema: dict[str, Any], value: Any) -> list[str]:
    """Messages of the CEL rules that `value` (already defaulted) breaks, anywhere in it."""
    environment = celpy.Environment()
    failures = []
    for rule in schema.get("x-kubernetes-validations", []):
        program = environment.program(environment.compile(rule["rule"]))
        if not program.evaluate({"self": celpy.json_to_cel(value)}):
            failures.append(rule["message"])
    if isinstance(value, dict):
        for name, child in (schema.get("properties") or {}).items():
            if name in value:
                failures += rule_failures(child, value[name])
    elif isinstance(value, list) and "items" in schema:
        for item in value:
            failures += rule_failures(schema["items"], item)
    return failures
