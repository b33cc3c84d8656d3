"""The GrokDeployment CustomResourceDefinition, generated from the pydantic spec.

`python -m grokserve.operator.crd` prints it; `manifests/crd/grokdeployments.yaml` and
`charts/grokserve/crds/grokdeployments.yaml` hold that output, and a test keeps them identical.
Cross-field rules the schema cannot state are CEL rules, rendered from the spec's rule table
(`spec.RULES`); whether a replica fits its GPUs needs the planner, which the operator runs (a
spec that does not fit gets Ready=False, reason DoesNotFit).
"""

from __future__ import annotations

import sys
from typing import Any

import yaml
from pydantic.alias_generators import to_camel

from grokserve.operator.spec import (
    API_GROUP,
    API_VERSION,
    KIND,
    MAX_NAME_LENGTH,
    NAME_PATTERN,
    PLURAL,
    RULES,
    GrokDeploymentSpec,
)

SHORT_NAMES = ["gd", "grokdep"]
_DROPPED_KEYS = {"title", "additionalProperties", "$defs"}


def _structural(node: Any, defs: dict[str, Any]) -> Any:
    """pydantic's JSON Schema -> a Kubernetes structural schema (no refs, no null unions)."""
    if isinstance(node, list):
        return [_structural(item, defs) for item in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target = defs[node["$ref"].rsplit("/", 1)[-1]]
        merged = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
        return _structural(merged, defs)
    if "anyOf" in node:
        options = [option for option in node["anyOf"] if option.get("type") != "null"]
        if len(options) != 1:
            raise ValueError(f"cannot express a union of {len(options)} types in a CRD: {node}")
        rest = {k: v for k, v in node.items() if k != "anyOf"}
        if rest.get("default", 0) is None:
            del rest["default"]
        return _structural({**options[0], **rest}, defs)
    if "patternProperties" in node:
        node = _map_with_checked_keys(node)
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROPPED_KEYS and not (key == "additionalProperties" and isinstance(value, dict)):
            continue
        if key == "exclusiveMinimum":
            out["minimum"] = value
            out["exclusiveMinimum"] = True
        elif key == "properties":
            out[key] = {name: _structural(child, defs) for name, child in value.items()}
        else:
            out[key] = _structural(value, defs)
    if out.get("type") == "object" and "properties" in out:
        # default_factory objects: an empty default lets the API server fill in nested defaults.
        required = out.get("required", [])
        for name, child in out["properties"].items():
            if "properties" in child and "default" not in child and name not in required:
                child["default"] = {}
    if out.get("type") == "string" and "enum" in out and "maxLength" not in out:
        out["maxLength"] = max(len(value) for value in out["enum"])
    return out


def _map_with_checked_keys(node: dict[str, Any]) -> dict[str, Any]:
    """pydantic's patternProperties/propertyNames (not allowed in a structural schema) as
    additionalProperties plus a CEL rule on the keys."""
    ((pattern, values),) = node["patternProperties"].items()
    names = node.get("propertyNames") or {}
    rest = {k: v for k, v in node.items() if k not in ("patternProperties", "propertyNames")}
    # In a CEL string literal a backslash is an escape: double it.
    literal = pattern.replace("\\", "\\\\")
    check = f"k.matches('{literal}')"
    if "maxLength" in names:
        check = f"size(k) <= {names['maxLength']} && {check}"
    rule = {
        "rule": f"self.all(k, {check})",
        "message": "every key must be a Kubernetes label key ([prefix/]name: a DNS subdomain of "
        "at most 253 characters, then at most 63 of letters, digits, '-', '_', '.')",
    }
    return {**rest, "additionalProperties": values, "x-kubernetes-validations": [rule]}


def spec_schema() -> dict[str, Any]:
    raw = GrokDeploymentSpec.model_json_schema(by_alias=True)
    schema = _structural(raw, raw.get("$defs", {}))
    for rule in RULES:
        node = schema
        for part in filter(None, rule.scope.split(".")):
            node = node["properties"][to_camel(part)]
        node.setdefault("x-kubernetes-validations", []).append(rule.cel())
    return schema


def _condition_schema() -> dict[str, Any]:
    return {
        "type": "object",
        "description": "A standard Kubernetes condition.",
        "required": ["type", "status"],
        "properties": {
            "type": {
                "type": "string",
                "description": "Ready, Progressing, Degraded or ScalingActive.",
            },
            "status": {
                "type": "string",
                "enum": ["True", "False", "Unknown"],
                "description": "Status.",
            },
            "reason": {"type": "string", "description": "CamelCase reason."},
            "message": {"type": "string", "description": "Human-readable detail."},
            "observedGeneration": {"type": "integer", "description": "Generation this describes."},
            "lastTransitionTime": {
                "type": "string",
                "format": "date-time",
                "description": "When the status last changed.",
            },
        },
    }


def status_schema() -> dict[str, Any]:
    def field(kind: str, description: str) -> dict[str, Any]:
        return {"type": kind, "description": description}

    return {
        "type": "object",
        "description": "Observed state, written by the operator.",
        # The autoscaler records its decisions under status.autoscaling.
        "x-kubernetes-preserve-unknown-fields": True,
        "properties": {
            "observedGeneration": field("integer", "The spec generation this status describes."),
            "replicas": field(
                "integer",
                "Replicas whose worker nodes exist, ready or not (/scale's current size).",
            ),
            "desiredReplicas": field("integer", "Replicas the spec asks for."),
            "readyReplicas": field("integer", "Replicas serving now."),
            "replicaSummary": field("string", "ready/desired, for kubectl get."),
            "gpus": field("integer", "GPUs the deployment asks for in total."),
            "selector": field("string", "Label selector of the deployment's pods (/scale)."),
            "endpoint": field("string", "OpenAI-compatible base URL inside the cluster."),
            "placement": field("string", "How replicas are laid out over nodes and GPUs."),
            "loading": {
                "type": "object",
                "description": "While replicas load their weights, how far they are, summed over "
                "the replicas still loading (from Prometheus: needs autoscaling.prometheusUrl); "
                "absent otherwise.",
                "properties": {
                    "bytesDone": field(
                        "integer",
                        "Bytes of the weights on the replicas' nodes: found in the node cache "
                        "or fetched so far.",
                    ),
                    "bytesNeeded": field(
                        "integer", "Bytes of the checkpoint the loading replicas' shards need."
                    ),
                    "bytesPerSecond": field(
                        "integer",
                        "Bytes per second fetched from the store over the last minute (absent "
                        "until Prometheus has two samples).",
                    ),
                },
            },
            "conditions": {
                "type": "array",
                "description": "Ready, Progressing, Degraded (and ScalingActive from the autoscaler).",
                "items": _condition_schema(),
                "x-kubernetes-list-type": "map",
                "x-kubernetes-list-map-keys": ["type"],
            },
        },
    }


def build_crd() -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{PLURAL}.{API_GROUP}",
            "labels": {"app.kubernetes.io/name": "grokserve"},
        },
        "spec": {
            "group": API_GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": KIND.lower(),
                "shortNames": SHORT_NAMES,
                "categories": ["all", "grokserve"],
            },
            "versions": [
                {
                    "name": API_VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {
                        "status": {},
                        "scale": {
                            "specReplicasPath": ".spec.replicas",
                            "statusReplicasPath": ".status.replicas",
                            "labelSelectorPath": ".status.selector",
                        },
                    },
                    "additionalPrinterColumns": [
                        {
                            "name": "Ready",
                            "type": "string",
                            "jsonPath": '.status.conditions[?(@.type=="Ready")].status',
                        },
                        {
                            "name": "Replicas",
                            "type": "string",
                            "jsonPath": ".status.replicaSummary",
                        },
                        {"name": "GPUs", "type": "integer", "jsonPath": ".status.gpus"},
                        {"name": "Endpoint", "type": "string", "jsonPath": ".status.endpoint"},
                        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
                    ],
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": "A served Grok model (Ray Serve on KubeRay).",
                            "required": ["spec"],
                            "properties": {
                                "apiVersion": {"type": "string", "description": "API version."},
                                "kind": {"type": "string", "description": "GrokDeployment."},
                                # The one restriction a CRD may put on metadata (no CEL rule at
                                # the root, whose errors the API server reports at <nil>).
                                "metadata": {
                                    "type": "object",
                                    "properties": {
                                        "name": {
                                            "type": "string",
                                            "maxLength": MAX_NAME_LENGTH,
                                            "pattern": NAME_PATTERN,
                                            "description": "At most "
                                            f"{MAX_NAME_LENGTH} characters of lowercase letters, "
                                            "digits and '-', starting with a letter (it names "
                                            "the Service and RayService).",
                                        }
                                    },
                                },
                                "spec": spec_schema(),
                                "status": status_schema(),
                            },
                        }
                    },
                }
            ],
        },
    }


def render_crd() -> str:
    header = (
        "# Generated by `python -m grokserve.operator.crd` from operator/spec.py; do not edit.\n"
    )
    return header + yaml.safe_dump(build_crd(), sort_keys=False, allow_unicode=True, width=100)


if __name__ == "__main__":
    sys.stdout.write(render_crd())
