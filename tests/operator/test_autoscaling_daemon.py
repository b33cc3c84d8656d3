"""One evaluation of the autoscaler daemon on numbers it cannot use: the size is held and
ScalingActive says why (no exception, which kopf would answer by restarting the daemon)."""

from __future__ import annotations

import logging
from typing import Any

import aiohttp
import pytest

from grokserve.operator.autoscaling import daemon


class RecordingKube:
    """The operator's client, recording status writes; a /scale write would be a failure."""

    def __init__(self) -> None:
        self.statuses: list[dict[str, Any]] = []

    def update_status(self, resource: Any, namespace: str, name: str, status_for: Any) -> None:
        self.statuses.append(status_for({"status": {}}))

    def scale(self, *_: Any) -> None:
        raise AssertionError("the size must be held")


@pytest.mark.parametrize("ready", ["lots", -3])
async def test_a_count_the_policy_cannot_use_holds_the_size(
    ready: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(daemon.kopf, "info", lambda *_, **__: None)
    monkeypatch.setattr(daemon.kopf, "warn", lambda *_, **__: None)
    body = {
        "metadata": {"generation": 4},
        "spec": {
            "replicas": 2,
            "autoscaling": {
                "enabled": True,
                "maxReplicas": 4,
                "prometheusUrl": "http://127.0.0.1:9",
            },
        },
        "status": {"readyReplicas": ready},
    }
    kube = RecordingKube()
    autoscaler = daemon.Autoscaler("llm", "g", body, kube, logging.getLogger(__name__))
    async with aiohttp.ClientSession() as session:
        assert await autoscaler.tick(session) == 30
    (status,) = kube.statuses
    condition = status["conditions"][-1]
    assert (condition["type"], condition["status"]) == ("ScalingActive", "False")
    assert condition["observedGeneration"] == 4
    assert status["autoscaling"]["desiredReplicas"] == 2
    # "lots" is no number at all; -3 is one that the policy refuses (Prometheus, down here, is
    # never the reason reported for it).
    assert condition["reason"] == daemon.INVALID_INPUT
