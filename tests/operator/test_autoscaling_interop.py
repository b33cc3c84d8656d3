"""The alternatives to the built-in autoscaler (KEDA, HPA) and the Grafana dashboard: the manifests
target what the CRD's scale subresource offers, their queries and the dashboard's parse in a real
Prometheus, and the chart template renders the dashboard into a ConfigMap."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from grokserve.operator.autoscaling.prometheus import WAITING_QUERY, render_query
from grokserve.operator.spec import API_GROUP, API_VERSION, KIND
from grokserve.serving.metrics import ReplicaMetrics, RequestMetrics
from testkit.prometheus import PrometheusServer

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "manifests" / "examples" / "autoscaling"
CHART = ROOT / "charts" / "grokserve"
DASHBOARD = CHART / "dashboards" / "grokserve.json"
CRD = ROOT / "manifests" / "crd" / "grokdeployments.yaml"
# Grafana's template variables, replaced by values a plain Prometheus accepts.
GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$namespace": ".*",
    "$deployment": ".*",
    "$layer": ".*",
}


@pytest.fixture(scope="module")
def prometheus() -> Iterator[PrometheusServer]:
    with PrometheusServer([]) as server:
        yield server


def load(name: str) -> dict[str, Any]:
    return yaml.safe_load((EXAMPLES / name).read_text())


def assert_valid_promql(prometheus: PrometheusServer, expression: str) -> None:
    # Prometheus answers HTTP 400 with the parser's message for anything it cannot parse.
    prometheus.api("query", query=expression)


def test_the_crd_offers_the_scale_subresource_keda_and_the_hpa_need() -> None:
    crd = yaml.safe_load(CRD.read_text())
    scale = next(v for v in crd["spec"]["versions"] if v["name"] == API_VERSION)["subresources"]
    assert scale["scale"] == {
        "specReplicasPath": ".spec.replicas",
        "statusReplicasPath": ".status.replicas",
        "labelSelectorPath": ".status.selector",
    }


@pytest.mark.parametrize("name", ["keda-scaledobject.yaml", "hpa-external.yaml"])
def test_examples_target_a_grokdeployment(name: str) -> None:
    target = load(name)["spec"]["scaleTargetRef"]
    assert target["apiVersion"] == f"{API_GROUP}/{API_VERSION}" and target["kind"] == KIND


def test_keda_example_uses_the_built_in_query(prometheus: PrometheusServer) -> None:
    scaled = load("keda-scaledobject.yaml")
    namespace, name = scaled["metadata"]["namespace"], scaled["spec"]["scaleTargetRef"]["name"]
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue"
    assert trigger["metadata"]["query"] == render_query(WAITING_QUERY, namespace, name)
    assert float(trigger["metadata"]["threshold"]) > 0
    assert_valid_promql(prometheus, trigger["metadata"]["query"])


def test_hpa_example_is_a_valid_autoscaling_v2_object() -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    hpa = load("hpa-external.yaml")
    kubernetes_validate.validate(hpa, "1.30", strict=True)
    (metric,) = hpa["spec"]["metrics"]
    assert metric["external"]["metric"]["name"] == "grokserve_requests_waiting"
    assert metric["external"]["target"]["type"] == "AverageValue"


def dashboard_expressions(dashboard: dict[str, Any]) -> list[str]:
    expressions = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    for variable in dashboard["templating"]["list"]:
        query = variable.get("query")
        if isinstance(query, dict):
            # label_values(<selector>, label) is Grafana's; the selector inside is PromQL.
            match = re.fullmatch(r"label_values\((.+), \w+\)", query["query"])
            assert match, query
            expressions.append(match.group(1))
    return expressions


def test_dashboard_queries_parse_and_cover_the_promised_panels(
    prometheus: PrometheusServer,
) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    titles = " | ".join(panel["title"].lower() for panel in dashboard["panels"])
    for topic in (
        "queue depth",
        "desired / ready",
        "first token",
        "inter-token",
        "tokens per second",
        "expert load",
    ):
        assert topic in titles
    assert any(panel["type"] == "heatmap" for panel in dashboard["panels"])
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for expression in dashboard_expressions(dashboard):
        for variable, value in GRAFANA_VARIABLES.items():
            expression = expression.replace(variable, value)
        assert "$" not in expression, expression
        assert_valid_promql(prometheus, expression)


SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}


def exposed_names(registry: Any) -> set[str]:
    """Series names a registry exposes, whether or not any labelled child has been created yet."""
    return {
        family.name + suffix
        for family in registry.collect()
        for suffix in SUFFIXES.get(family.type, ("",))
    }


def dashboard_metric_names() -> set[str]:
    text = " ".join(dashboard_expressions(json.loads(DASHBOARD.read_text())))
    return set(re.findall(r"\b(grok(?:serve|deployment)_[a-z_]+)\b", text))


def test_dashboard_uses_the_operator_and_autoscaler_metrics_that_exist() -> None:
    from prometheus_client import REGISTRY

    import grokserve.operator.autoscaling.metrics
    import grokserve.operator.metrics  # noqa: F401  (registers the operator's metrics)

    ours = {
        n
        for n in dashboard_metric_names()
        if n.startswith(("grokdeployment_", "grokserve_autoscaler_"))
    }
    assert ours, "the dashboard shows no operator or autoscaler metric"
    assert ours <= exposed_names(REGISTRY)


def test_dashboard_uses_the_serving_metrics_that_exist() -> None:
    serving = {
        n
        for n in dashboard_metric_names()
        if not n.startswith(("grokdeployment_", "grokserve_autoscaler_"))
    }
    exposed = exposed_names(ReplicaMetrics("grok-1", "0").registry)
    assert serving <= exposed | exposed_names(RequestMetrics("grok-1", lambda: 0).registry)


def render_configmaps(values: dict[str, Any]) -> list[dict[str, Any]]:
    helm = pytest.importorskip("helm_python")
    rendered = helm.Chart.load(str(CHART)).render(values, name="llm-serving", namespace="llm")
    return [
        doc
        for path, text in rendered.items()
        if path.endswith(".yaml")
        for doc in yaml.safe_load_all(text)
        if doc and doc["kind"] == "ConfigMap"
    ]


def test_chart_option_renders_the_dashboard_into_a_sidecar_configmap() -> None:
    assert render_configmaps({}) == []
    (configmap,) = render_configmaps(
        {"grafanaDashboard": {"enabled": True, "namespace": "monitoring"}}
    )
    assert configmap["metadata"]["namespace"] == "monitoring"
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(configmap["data"]["grokserve.json"]) == json.loads(DASHBOARD.read_text())
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    kubernetes_validate.validate(configmap, "1.33", strict=True)


def test_dashboard_labels_and_annotations_are_configurable() -> None:
    (configmap,) = render_configmaps(
        {
            "grafanaDashboard": {
                "enabled": True,
                # null drops the default label (Helm merges maps with the chart's defaults).
                "labels": {"grafana_dashboard": None, "dashboards": "grafana"},
                "annotations": {"grafana_folder": "LLM"},
            }
        }
    )
    assert configmap["metadata"]["labels"]["dashboards"] == "grafana"
    assert "grafana_dashboard" not in configmap["metadata"]["labels"]
    assert configmap["metadata"]["annotations"] == {"grafana_folder": "LLM"}
    assert configmap["metadata"]["namespace"] == "llm"


def test_values_schema_rejects_a_misspelt_dashboard_option() -> None:
    helm = pytest.importorskip("helm_python")
    with pytest.raises(helm.HelmError, match="enable"):
        render_configmaps({"grafanaDashboard": {"enable": True}})
