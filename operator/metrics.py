"""The operator's own Prometheus metrics (served on their own port by `grokserve operator`)."""

from __future__ import annotations

import contextlib

from prometheus_client import Gauge, Histogram

LABELS = ("namespace", "name")

DESIRED_REPLICAS = Gauge(
    "grokdeployment_desired_replicas", "Replicas a GrokDeployment's spec asks for.", LABELS
)
READY_REPLICAS = Gauge(
    "grokdeployment_ready_replicas", "Replicas of a GrokDeployment serving now.", LABELS
)
CONDITION_READY = Gauge(
    "grokdeployment_condition_ready", "1 when a GrokDeployment's Ready condition is True.", LABELS
)
RECONCILE_SECONDS = Histogram(
    "grokdeployment_reconcile_duration_seconds",
    "Time to reconcile one GrokDeployment (apply children, read status).",
    ("outcome",),
)


def record(namespace: str, name: str, desired: int | None, ready: int, is_ready: bool) -> None:
    if desired is not None:
        DESIRED_REPLICAS.labels(namespace, name).set(desired)
    READY_REPLICAS.labels(namespace, name).set(ready)
    CONDITION_READY.labels(namespace, name).set(1 if is_ready else 0)


def forget(namespace: str, name: str) -> None:
    for gauge in (DESIRED_REPLICAS, READY_REPLICAS, CONDITION_READY):
        with contextlib.suppress(KeyError):
            gauge.remove(namespace, name)
