"""The CRD: generated from the spec model, shipped identically in manifests/ and the chart."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from grokserve.operator.crd import build_crd, render_crd
from testkit.kube_schemas import CRD_FILE, REPO, grokdeployment_validator, schema_errors

EXAMPLES = sorted((REPO / "manifests" / "examples").glob("*.yaml"))


def test_manifest_is_the_generated_crd() -> None:
    assert CRD_FILE.read_text() == render_crd(), (
        "manifests/crd/grokdeployments.yaml is stale: run "
        "`python -m grokserve.operator.crd > manifests/crd/grokdeployments.yaml`"
    )


def test_chart_ships_the_same_crd() -> None:
    assert (
        REPO / "charts" / "grokserve" / "crds" / "grokdeployments.yaml"
    ).read_text() == CRD_FILE.read_text()


def _undescribed(schema: dict, path: str) -> list[str]:
    missing = [] if "description" in schema else [path]
    for name, child in (schema.get("properties") or {}).items():
        missing += _undescribed(child, f"{path}.{name}")
    if "items" in schema:
        missing += _undescribed(schema["items"], f"{path}[]")
    return missing


def test_every_spec_field_has_a_description() -> None:
    spec = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    assert _undescribed(spec, "spec") == []


def test_scale_subresource_and_cel_rules() -> None:
    version = build_crd()["spec"]["versions"][0]
    assert version["subresources"]["scale"] == {
        "specReplicasPath": ".spec.replicas",
        "statusReplicasPath": ".status.replicas",
        "labelSelectorPath": ".status.selector",
    }
    spec = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
    rules = [r["rule"] for r in spec["x-kubernetes-validations"]]
    # generated from the model's preset table, guarded so that it evaluates on any object
    assert (
        "!(has(self.model) && has(self.model.preset) && has(self.parallelism) && "
        "has(self.parallelism.tensor) && self.model.preset in ['grok-1', 'grok-tiny', "
        "'grok-mini']) || (({'grok-1': 8, 'grok-tiny': 4, 'grok-mini': 4}[self.model.preset] % "
        "self.parallelism.tensor) == 0)" in rules
    )
    presets = spec["properties"]["model"]["properties"]["preset"]["enum"]
    assert presets == ["grok-1", "grok-tiny", "grok-mini"]
    assert [c["name"] for c in version["additionalPrinterColumns"]] == [
        "Ready",
        "Replicas",
        "GPUs",
        "Endpoint",
        "Age",
    ]


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_validate_against_the_crd(path: Path) -> None:
    for body in yaml.safe_load_all(path.read_text()):
        if body and body.get("kind") == "GrokDeployment":
            assert schema_errors(grokdeployment_validator(), body) == []


def test_the_crd_schema_rejects_bad_fields() -> None:
    body = {
        "apiVersion": "grokserve.io/v1alpha1",
        "kind": "GrokDeployment",
        "metadata": {"name": "Grok-1"},
        "spec": {
            "model": {"preset": "grok-9", "dtype": "float16"},
            "replicas": -2,
            "ray": {"upgradeStrategy": "NewClusterWithIncrementalUpgrade"},
        },
    }
    errors = schema_errors(grokdeployment_validator(), body)
    assert any(e.startswith("spec.ray.upgradeStrategy:") for e in errors)
    assert any(e.startswith("spec.model.preset:") for e in errors)
    assert any(e.startswith("spec.model.dtype:") for e in errors)
    assert any(e.startswith("spec.replicas:") for e in errors)
    assert any(e.startswith("metadata.name:") for e in errors)


def test_kubernetes_validate_accepts_the_crd() -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    kubernetes_validate.validate(yaml.safe_load(CRD_FILE.read_text()), "1.33", strict=True)


def _rules_with_nodes(schema: dict, path: str = "spec"):
    for rule in schema.get("x-kubernetes-validations", []):
        yield path, schema, rule
    for name, child in (schema.get("properties") or {}).items():
        yield from _rules_with_nodes(child, f"{path}.{name}")


def test_every_generated_rule_is_reported_at_a_field_of_its_node() -> None:
    # The API server refuses a CRD whose fieldPath names no property, and reports a rule without
    # one at its node (`<nil>` for the spec's own rules).
    root = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    assert "x-kubernetes-validations" not in root  # metadata.name is a schema restriction
    rules = list(_rules_with_nodes(root["properties"]["spec"]))
    assert len(rules) >= 10
    for path, node, rule in rules:
        if "properties" not in node:
            continue  # a rule on one field (a string, a map's keys) is reported at that field
        assert "fieldPath" in rule, (path, rule["message"])
        target = node
        for part in rule["fieldPath"].removeprefix(".").split("."):
            target = target["properties"][part]
