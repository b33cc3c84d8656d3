"""Offline rendering of GrokDeployment documents into their children (`grokserve render`)."""

from __future__ import annotations

from typing import Any

import yaml

from grokserve.operator.builders import Owner, build_children
from grokserve.operator.replica import replica_plan
from grokserve.operator.spec import KIND, SpecError, parse_resource


class _LiteralDumper(yaml.SafeDumper):
    """Multi-line strings (serveConfigV2, serving.yaml) as readable `|` blocks."""


def _string(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_LiteralDumper.add_representer(str, _string)


def to_yaml(documents: list[dict[str, Any]]) -> str:
    return yaml.dump_all(documents, Dumper=_LiteralDumper, sort_keys=False, allow_unicode=True)


class RenderError(ValueError):
    """A document that cannot be rendered; the message says which one and why."""


def render_documents(
    text: str, *, namespace: str, with_servicemonitor: bool
) -> list[dict[str, Any]]:
    try:
        documents = [doc for doc in yaml.safe_load_all(text) if doc is not None]
    except yaml.YAMLError as error:
        raise RenderError(f"not valid YAML: {error}") from None
    deployments = [doc for doc in documents if isinstance(doc, dict) and doc.get("kind") == KIND]
    if not deployments:
        raise RenderError(f"no {KIND} object found")
    children: list[dict[str, Any]] = []
    for body in deployments:
        name = (body.get("metadata") or {}).get("name", "?")
        try:
            spec = parse_resource(body)
            metadata = body["metadata"]
            owner = Owner(name=metadata["name"], namespace=metadata.get("namespace", namespace))
            plan = replica_plan(owner.name, spec)
        except SpecError as error:
            raise RenderError(f"{KIND} {name}: {error.message}") from None
        children.extend(build_children(owner, spec, plan, with_servicemonitor=with_servicemonitor))
    return children
