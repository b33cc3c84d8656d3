"""Which GrokDeployment states a RayService event may rewrite (the reconcile owns the others)."""

from __future__ import annotations

from typing import Any

from grokserve.operator.reconcile import observable


def grokdeployment(generation: int, observed: int | None, ready_reason: str) -> dict[str, Any]:
    return {
        "metadata": {"name": "grok-1", "namespace": "llm", "generation": generation},
        "status": {
            "observedGeneration": observed,
            "conditions": [{"type": "Ready", "status": "False", "reason": ready_reason}],
        },
    }


def test_a_reconciled_generation_follows_its_rayservice() -> None:
    assert observable(grokdeployment(2, 2, "RayServiceUpdating"))


def test_a_generation_not_reconciled_yet_is_not_claimed_observed() -> None:
    assert not observable(grokdeployment(3, 2, "Serving"))
    assert not observable({"metadata": {"generation": 1}})


def test_a_failed_reconcile_stands_until_the_next_reconcile() -> None:
    for reason in ("Forbidden", "ChildRejected", "KubeRayMissing"):
        assert not observable(grokdeployment(2, 2, reason))
