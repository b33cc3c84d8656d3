"""The CRD's CEL rules, evaluated on defaulted objects: they accept every example and reject what
the operator's pydantic model rejects for the same reason."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

pytest.importorskip("celpy", reason="cel-python is not installed")

from grokserve.operator.spec import SpecError, parse_resource
from testkit.crd_cel import apply_defaults, defaults_breaking_rules, rule_failures
from testkit.kube_schemas import CRD_FILE, grokdeployment_validator, schema_errors

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "manifests" / "examples").glob("*.yaml"))
SCHEMA = yaml.safe_load(CRD_FILE.read_text())["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
BASE = {
    "apiVersion": "grokserve.io/v1alpha1",
    "kind": "GrokDeployment",
    "metadata": {"name": "grok-1", "namespace": "llm"},
    "spec": {
        "model": {"preset": "grok-1", "source": "pvc://weights/grok-1"},
        "parallelism": {"tensor": 8, "expert": 8},
    },
}


def changed(name: str | None = None, **spec: dict) -> dict:
    body = copy.deepcopy(BASE)
    if name is not None:
        body["metadata"]["name"] = name
    for key, value in spec.items():
        body["spec"][key] = (
            {**body["spec"].get(key, {}), **value} if isinstance(value, dict) else value
        )
        if isinstance(value, dict):  # None removes a field
            body["spec"][key] = {k: v for k, v in body["spec"][key].items() if v is not None}
    return body


def cel(body: dict) -> list[str]:
    return rule_failures(SCHEMA, apply_defaults(SCHEMA, body))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_pass_every_rule(path: Path) -> None:
    for body in yaml.safe_load_all(path.read_text()):
        assert cel(body) == []


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            changed(parallelism={"tensor": 3}),
            "parallelism.tensor must divide gpusPerNode × nodesPerReplica",
        ),
        (
            changed(parallelism={"expert": 16}),
            "parallelism.expert must divide gpusPerNode × nodesPerReplica",
        ),
        (
            changed(parallelism={"tensor": 16, "nodesPerReplica": 2}),
            "parallelism.tensor must divide the model's kv heads (grok-1: 8, grok-tiny: 4",
        ),
        (
            changed(model={"preset": "grok-tiny"}, parallelism={"tensor": 8, "expert": 1}),
            "parallelism.tensor must divide the model's kv heads (grok-1: 8, grok-tiny: 4",
        ),
        (
            changed(parallelism={"expert": 16, "nodesPerReplica": 2}),
            "parallelism.expert must divide the model's experts (grok-1: 8",
        ),
        (
            changed(autoscaling={"minReplicas": 3, "maxReplicas": 2}),
            "autoscaling.minReplicas must be ≤ autoscaling.maxReplicas",
        ),
        (
            changed(autoscaling={"enabled": True, "maxReplicas": 3}),
            "autoscaling.prometheusUrl is required when autoscaling is enabled",
        ),
        (
            changed(autoscaling={"minReplicas": 0}),
            "autoscaling.minReplicas 0 needs autoscaling.scaleToZeroIdleSeconds",
        ),
        (
            changed(
                replicas=5,
                autoscaling={"enabled": True, "maxReplicas": 4, "prometheusUrl": "http://p:9090"},
            ),
            "replicas must lie within autoscaling.minReplicas..maxReplicas while autoscaling is enabled",
        ),
        (changed(model={"source": None}), "model.source is required for grok-1"),
        (
            changed(
                model={"preset": "grok-tiny", "source": None}, serving={"maxSequenceLength": 2048}
            ),
            "serving.maxSequenceLength must not exceed the model's context (grok-1: 8192, "
            "grok-tiny: 1024",
        ),
        (
            changed(model={"cache": {"type": "hostPath"}}),
            "model.cache.path is required with type hostPath and applies to it only",
        ),
        (
            changed(model={"cache": {"path": "/mnt/nvme"}}),
            "model.cache.path is required with type hostPath and applies to it only",
        ),
        (
            changed(model={"cache": {"type": "pvc", "sizeLimit": "1Ti"}}),
            "model.cache.sizeLimit applies to type emptyDir only",
        ),
        (
            changed(model={"cache": {"type": "pvc"}}),
            "model.cache.claim is required with type pvc and applies to it only",
        ),
    ],
)
def test_rules_reject_what_the_operator_rejects(body: dict, message: str) -> None:
    failures = cel(body)
    assert any(f.startswith(message) for f in failures), failures
    with pytest.raises(SpecError):
        parse_resource(body)


def test_defaults_make_a_minimal_object_valid() -> None:
    body = {**BASE, "spec": {"model": {"preset": "grok-tiny"}}}
    defaulted = apply_defaults(SCHEMA, body)
    assert defaulted["spec"]["parallelism"]["gpusPerNode"] == 8
    assert defaulted["spec"]["autoscaling"]["enabled"] is False
    assert cel(body) == []


def test_every_rule_holds_on_its_nodes_raw_default() -> None:
    """At CRD creation the API server evaluates each rule on its node's raw `default`, nested
    defaults not applied: `default: {}` on autoscaling made the whole CRD invalid."""
    assert defaults_breaking_rules(SCHEMA) == []
    spec = SCHEMA["properties"]["spec"]["properties"]
    for node in ("parallelism", "autoscaling"):  # not vacuous: defaulted nodes with rules
        assert "default" in spec[node] and spec[node]["x-kubernetes-validations"]


def test_an_unknown_preset_is_only_the_enums_error() -> None:
    """Preset-indexed rules are guarded: `grok-2` gives the enum error, not also `no such key`."""
    body = changed(model={"preset": "grok-2"})
    assert cel(body) == []
    errors = schema_errors(grokdeployment_validator(), body)
    assert [e.split(":")[0] for e in errors] == ["spec.model.preset"]
