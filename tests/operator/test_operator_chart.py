"""The Helm chart: strict lint, renders for each documented variant, valid Kubernetes objects."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from testkit.operator_env import PEERING_GRANTS

helm = pytest.importorskip("helm_python", reason="helm-python-sdk is not installed")
kubernetes_validate = pytest.importorskip("kubernetes_validate")

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "grokserve"
WARNING = 2  # helm's lint severities: 1 info, 2 warning, 3 error
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


def test_strict_lint_is_clean() -> None:
    report = helm.lint(str(CHART), strict=True)
    assert [m for m in report["messages"] if m["severity"] >= WARNING] == []


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_each_variant_renders_valid_objects(variant: str) -> None:
    objects = render(VARIANTS[variant])
    for obj in objects:
        if obj["apiVersion"].split("/")[0] in ("monitoring.coreos.com", "kopf.dev"):
            continue  # not a built-in kind; kubernetes-validate has no schema for it
        kubernetes_validate.validate(obj, "1.33", strict=True)
    kinds = sorted(o["kind"] for o in objects)
    if variant == "namespaced":
        # Two namespaces, each with the operator's and peering's Role and RoleBinding.
        rbac = ["Role"] * 4 + ["RoleBinding"] * 4 + ["KopfPeering"] * 2
    else:
        rbac = ["ClusterRole"] * 2 + ["ClusterRoleBinding"] * 2 + ["ClusterKopfPeering"]
    expected = sorted([*rbac, "Deployment", "Service", "ServiceAccount"])
    if variant == "monitored":
        expected = sorted([*expected, "ServiceMonitor"])
    assert kinds == expected


def test_a_namespaced_install_grants_nothing_cluster_wide() -> None:
    objects = render(VARIANTS["namespaced"])
    roles = [o for o in objects if o["kind"] in ("Role", "RoleBinding", "KopfPeering")]
    assert {o["metadata"]["namespace"] for o in roles} == {"llm", "research"}
    assert not [o for o in objects if o["kind"].startswith("Cluster")]
    (role,) = [
        o
        for o in roles
        if o["kind"] == "Role"
        and o["metadata"]["name"] == "grokserve-operator"
        and o["metadata"]["namespace"] == "llm"
    ]
    manifest = yaml.safe_load((REPO / "manifests/rbac/clusterrole.yaml").read_text())
    cluster_scoped = {"customresourcedefinitions", "namespaces"}
    assert role["rules"] == [
        r for r in manifest["rules"] if not set(r["resources"]) & cluster_scoped
    ]


def test_two_replicas_coordinate_through_peering() -> None:
    objects = render({"replicaCount": 2})
    deployment = by_kind(objects, "Deployment")
    assert deployment["spec"]["replicas"] == 2
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    peering = by_kind(objects, "ClusterKopfPeering")["metadata"]["name"]
    assert f"--peering={peering}" in container["args"]
    peering_crds = {
        doc["spec"]["names"]["kind"]
        for doc in yaml.safe_load_all((CHART / "crds" / "kopf-peering.yaml").read_text())
    }
    assert peering_crds == {"ClusterKopfPeering", "KopfPeering"}
    (role,) = [
        o
        for o in objects
        if o["kind"] == "ClusterRole" and o["metadata"]["name"].endswith("-peering")
    ]
    grants = {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    assert grants == PEERING_GRANTS  # what test_operator_ha.py finds the operators using


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
    (role,) = [
        o
        for o in render({})
        if o["kind"] == "ClusterRole" and "peering" not in o["metadata"]["name"]
    ]
    rules = role["rules"]
    manifest = yaml.safe_load((REPO / "manifests/rbac/clusterrole.yaml").read_text())
    assert rules == manifest["rules"]


def test_values_schema_rejects_bad_values() -> None:
    with pytest.raises(helm.HelmError, match="resyncSeconds"):
        render({"resyncSeconds": 1})
    with pytest.raises(helm.HelmError, match="metrics.port and health.port are both 8081"):
        render({"metrics": {"port": 8081}})


def test_plain_manifests_are_valid_objects() -> None:
    for path in sorted((REPO / "manifests").glob("[!e]*/*.yaml")):
        for obj in yaml.safe_load_all(path.read_text()):
            kubernetes_validate.validate(obj, "1.33", strict=True)
