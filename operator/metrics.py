"""The operator's own Prometheus metrics (served on their own port by `grokserve operator`)."""

from __future__ import annotations

import contextlib

from prometheus_client import Counter, Gauge, Histogram

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
    "Time of one reconcile pass over a GrokDeployment (children, then status).",
    ("outcome",),
)
QUEUE_DEPTH = Gauge(
    "grokdeployment_reconcile_queue_depth",
    "GrokDeployments waiting for a reconcile pass (queued, not yet being reconciled).",
)
API_REQUESTS = Counter(
    "grokserve_operator_api_requests_total",
    "Requests the operator's client made to the Kubernetes API server (kopf's watch streams and "
    "Events aside), by verb and HTTP status code (0: no answer).",
    ("verb", "code"),
)
WRITES_SKIPPED = Counter(
    "grokserve_operator_writes_skipped_total",
    "Writes not sent because the object as last seen already held what they would write, by "
    "kind (a child's kind, or status).",
    ("kind",),
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
