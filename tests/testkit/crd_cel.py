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


def rule_holds(rule: str, value: Any) -> bool | str:
    """True or False, or the evaluation error (e.g. `no such key`) as the API server reports it."""
    environment = celpy.Environment()
    program = environment.program(environment.compile(rule))
    try:
        result = program.evaluate({"self": celpy.json_to_cel(value)})
    except celpy.CELEvalError as error:
        return f"error: {error}"
    if isinstance(result, celpy.CELEvalError):
        return f"error: {result}"
    return bool(result)


def rule_failures(schema: dict[str, Any], value: Any) -> list[str]:
    """Messages of the CEL rules that `value` (already defaulted) breaks, anywhere in it; a rule
    that cannot be evaluated (a missing key) fails with its error appended."""
    failures = []
    for rule in schema.get("x-kubernetes-validations", []):
        outcome = rule_holds(rule["rule"], value)
        if outcome is not True:
            failures.append(rule["message"] + ("" if outcome is False else f" ({outcome})"))
    if isinstance(value, dict):
        for name, child in (schema.get("properties") or {}).items():
            if name in value:
                failures += rule_failures(child, value[name])
    elif isinstance(value, list) and "items" in schema:
        for item in value:
            failures += rule_failures(schema["items"], item)
    return failures


def defaults_breaking_rules(schema: dict[str, Any], path: str = "") -> list[str]:
    """What the API server refuses at CRD creation: every node's raw `default` (nested defaults
    NOT applied) must satisfy that node's rules and those of the nodes inside the default."""
    found = []
    if "default" in schema:
        found += [f"{path or '.'}: {m}" for m in rule_failures(schema, schema["default"])]
    for name, child in (schema.get("properties") or {}).items():
        found += defaults_breaking_rules(child, f"{path}.{name}")
    if isinstance(schema.get("items"), dict):
        found += defaults_breaking_rules(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        found += defaults_breaking_rules(schema["additionalProperties"], f"{path}{{}}")
    return found
