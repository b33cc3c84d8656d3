"""The Helm chart: strict lint, renders for each documented variant, valid Kubernetes objects."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

helm = pytest.importorskip("helm_python", reason="helm-python-sdk is not installed")
kubernetes_validate = pytest.importorskip("kubernetes_validate")

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "grokserve"
ERROR = 3  # helm's lint severities: 1 info, 2 warning, 3 error
VARIANTS = {
    "default": {},
    "namespaced": {"watchNamespaces": ["llm", "research"]},
    "monitored": {
        "metrics": {"port": 9100, "serviceMonitor": {"enabled": True, "interval": "15s"}}
    },
    "pinned": {"image": {"tag": "0.1.1"}, "nodeSelector": {"pool": "system"}},
}


def render(values: dict) -> list[dict]:
    manifests = helm.Chart.load(str(CHART)).render(
        values, name="grokserve", namespace="grokserve-system", is_install=True
    )
    return [
        doc
        for path, text in manifests.items()
        if path.endswith(".yaml")
        for doc in yaml.safe_load_all(text)
        if doc
    ]


def by_kind(objects: list[dict], kind: str) -> dict:
    (found,) = [o for o in objects if o["kind"] == kind]
    return found


def test_strict_lint_reports_no_errors() -> None:
    report = helm.lint(str(CHART), strict=True)
    assert [m for m in report["messages"] if m["severity"] >= ERROR] == []


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_each_variant_renders_valid_objects(variant: str) -> None:
    objects = render(VARIANTS[variant])
    for obj in objects:
        if obj["apiVersion"].startswith("monitoring.coreos.com"):
            continue  # not a built-in kind; kubernetes-validate has no schema for it
        kubernetes_validate.validate(obj, "1.33", strict=True)
    kinds = sorted(o["kind"] for o in objects)
    expected = ["ClusterRole", "ClusterRoleBinding", "Deployment", "Service", "ServiceAccount"]
    if variant == "monitored":
        expected = sorted([*expected, "ServiceMonitor"])
    assert kinds == expected


def test_operator_pod_is_locked_down_and_configured() -> None:
    objects = render(VARIANTS["namespaced"])
    pod = by_kind(objects, "Deployment")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert {"livenessProbe", "readinessProbe", "resources"} <= set(container)
    assert "--namespace=llm" in container["args"] and "--namespace=research" in container["args"]
    assert container["image"] == "ghcr.io/grokserve/grokserve-operator:0.1.0"


def test_chart_rbac_is_the_tested_clusterrole() -> None:
    rules = by_kind(render({}), "ClusterRole")["rules"]
    manifest = yaml.safe_load((REPO / "manifests/rbac/clusterrole.yaml").read_text())
    assert rules == manifest["rules"]


def test_values_schema_rejects_bad_values() -> None:
    with pytest.raises(helm.HelmError, match="resyncSeconds"):
        render({"resyncSeconds": 1})


def test_plain_manifests_are_valid_objects() -> None:
    for path in sorted((REPO / "manifests").glob("[!e]*/*.yaml")):
        for obj in yaml.safe_load_all(path.read_text()):
            kubernetes_validate.validate(obj, "1.33", strict=True)
