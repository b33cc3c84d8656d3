"""The autoscaler's metrics of a deployment disappear with its autoscaler, and only those."""

from __future__ import annotations

from prometheus_client import REGISTRY

from grokserve.operator.autoscaling import metrics
from grokserve.operator.autoscaling.policy import Decision


def decision(reason: str, replicas: int) -> Decision:
    return Decision(
        current=1,
        replicas=replicas,
        reason=reason,
        message="",
        scaling_active=True,
        observed_waiting=4,
        recommendation=replicas,
    )


def decisions(name: str, reason: str) -> float | None:
    return REGISTRY.get_sample_value(
        "grokserve_autoscaler_decisions_total", {"namespace": "ns", "name": name, "reason": reason}
    )


def test_forget_drops_every_series_of_that_deployment() -> None:
    for name in ("gone", "kept"):
        metrics.record("ns", name, decision("ScaleUp", 2))
        metrics.record("ns", name, decision("WithinTolerance", 1))
    metrics.forget("ns", "gone")
    assert decisions("gone", "ScaleUp") is None and decisions("gone", "WithinTolerance") is None
    labels = {"namespace": "ns", "name": "gone"}
    assert REGISTRY.get_sample_value("grokserve_autoscaler_desired_replicas", labels) is None
    assert decisions("kept", "ScaleUp") == 1 and decisions("kept", "WithinTolerance") == 1
    metrics.forget("ns", "kept")
