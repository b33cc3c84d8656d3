"""The autoscaler's decisions as Prometheus metrics (served by the operator's metrics endpoint)."""

from __future__ import annotations

import contextlib

from prometheus_client import Counter, Gauge

from grokserve.operator.autoscaling.policy import Decision

LABELS = ("namespace", "name")

OBSERVED_WAITING = Gauge(
    "grokserve_autoscaler_observed_waiting_requests",
    "Waiting requests of the deployment as last read from Prometheus.",
    LABELS,
)
RECOMMENDED_REPLICAS = Gauge(
    "grokserve_autoscaler_recommended_replicas",
    "The policy's recommendation before stabilization windows and step limits.",
    LABELS,
)
DESIRED_REPLICAS = Gauge(
    "grokserve_autoscaler_desired_replicas",
    "The replica count the autoscaler decided on (written through /scale when it changes).",
    LABELS,
)
SCALING_ACTIVE = Gauge(
    "grokserve_autoscaler_scaling_active",
    "1 while the autoscaler can read its metric, 0 while it holds the size (see ScalingActive).",
    LABELS,
)
DECISIONS = Counter(
    "grokserve_autoscaler_decisions",
    "Autoscaler evaluations by outcome reason (ScaleUp, WithinTolerance, PrometheusUnreachable, …).",
    (*LABELS, "reason"),
)


def record(namespace: str, name: str, decision: Decision) -> None:
    labels = {"namespace": namespace, "name": name}
    DESIRED_REPLICAS.labels(**labels).set(decision.replicas)
    SCALING_ACTIVE.labels(**labels).set(1 if decision.scaling_active else 0)
    DECISIONS.labels(**labels, reason=decision.reason).inc()
    if decision.observed_waiting is not None:
        OBSERVED_WAITING.labels(**labels).set(decision.observed_waiting)
    if decision.recommendation is not None:
        RECOMMENDED_REPLICAS.labels(**labels).set(decision.recommendation)


def forget(namespace: str, name: str) -> None:
    """Drop a deployment's series when its autoscaler stops, so that dashboards do not show ghosts."""
    for gauge in (OBSERVED_WAITING, RECOMMENDED_REPLICAS, DESIRED_REPLICAS, SCALING_ACTIVE):
        with contextlib.suppress(KeyError):
            gauge.remove(namespace, name)
    # One series per reason it ever decided: read them off the counter's own samples.
    reasons = {
        sample.labels["reason"]
        for family in DECISIONS.collect()
        for sample in family.samples
        if (sample.labels["namespace"], sample.labels["name"]) == (namespace, name)
    }
    for reason in reasons:
        DECISIONS.remove(namespace, name, reason)
