"""The autoscaler end to end with real parts: a real Prometheus scraping a prometheus-client exporter
that the test drives, and the autoscaler daemon running in a real kopf operator against KMock."""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client import REGISTRY

from testkit.autoscaling import (
    RESOURCE,
    QueueExporter,
    create_grok_deployment,
    grokserve_api,
    request,
    running_operator,
    wait_until,
)
from testkit.prometheus import PrometheusServer, TestExporter

pytestmark = pytest.mark.slow

NAMESPACE, NAME, IDLE = "llm", "grok-1", "grok-idle"
SCRAPE_S, EVALUATION_S, DOWN_WINDOW_S = 1.0, 5, 12
REACTION_BOUND_S = SCRAPE_S + EVALUATION_S + 1.5


def autoscaling(prometheus_url: str, **overrides: Any) -> dict[str, Any]:
    return {
        "minReplicas": 1,
        "maxReplicas": 4,
        "prometheusUrl": prometheus_url,
        "targetQueuePerReplica": 8,
        "scaleDownStabilizationSeconds": DOWN_WINDOW_S,
        "scaleDownLimit": 4,
        "evaluationIntervalSeconds": EVALUATION_S,
        **overrides,
    }


async def test_queue_drives_replicas_through_scale_and_prometheus_loss_holds_them(
    exporter: TestExporter, prometheus: PrometheusServer
) -> None:
    queue = QueueExporter(exporter, (NAME, IDLE))
    # Prometheus hands out its first targets only ~5 s after start (discovery update period).
    prometheus.wait_for_targets_up(timeout_s=20)
    async with grokserve_api() as api:
        await create_grok_deployment(
            api, NAMESPACE, NAME, replicas=1, autoscaling=autoscaling(prometheus.url)
        )
        # A second deployment, scaled to zero, that may go back to zero after an idle minute.
        await create_grok_deployment(
            api,
            NAMESPACE,
            IDLE,
            replicas=0,
            autoscaling=autoscaling(prometheus.url, minReplicas=0, scaleToZeroIdleSeconds=60),
        )

        def status(name: str = NAME) -> dict[str, Any]:
            return api.objects[RESOURCE, NAMESPACE, name].raw.get("status", {})

        def replicas(name: str = NAME) -> int:
            return api.objects[RESOURCE, NAMESPACE, name].raw["spec"]["replicas"]

        def scale_writes(name: str = NAME) -> list[int]:
            return [replicas for _, written, replicas in api.scale_writes if written == name]

        def scaling_active() -> dict[str, Any]:
            conditions = status().get("conditions", [])
            return next((c for c in conditions if c["type"] == "ScalingActive"), {})

        def exported(metric: str) -> float | None:
            return REGISTRY.get_sample_value(metric, {"namespace": NAMESPACE, "name": NAME})

        async with running_operator(api):
            await wait_until("a first evaluation", lambda: "autoscaling" in status(), 10)
            assert replicas() == 1 and scaling_active()["status"] == "True"
            await wait_until("idle evaluated", lambda: "autoscaling" in status(IDLE), 10)
            assert replicas(IDLE) == 0 and status(IDLE)["autoscaling"]["reason"] == "IdleAtZero"

            # Another writer (the reconcile handler) replaces status.conditions without ours.
            ready = {"type": "Ready", "status": "False", "reason": "Waiting", "message": ""}
            path = (
                f"/apis/{RESOURCE.group}/{RESOURCE.version}/namespaces/{NAMESPACE}"
                f"/{RESOURCE.plural}/{NAME}/status"
            )
            await request(api, "PATCH", path, {"status": {"conditions": [ready]}})

            # 30 waiting at a target of 8 per replica → ceil(30 / 8) = 4 replicas; the idle
            # deployment's first queued request wakes it.
            queue.set(NAME, waiting=30, running=8)
            queue.set(IDLE, waiting=1)
            took = await wait_until("scale up to 4", lambda: replicas() == 4, 15)
            assert took <= REACTION_BOUND_S
            assert scale_writes() == [4]
            # The status write follows the /scale write.
            await wait_until(
                "status records the scale-up",
                lambda: status()["autoscaling"]["reason"] == "ScaleUp",
                3,
            )
            assert status()["autoscaling"]["lastScaleTime"]
            assert exported("grokserve_autoscaler_desired_replicas") == 4
            assert exported("grokserve_autoscaler_observed_waiting_requests") == 30
            await wait_until(
                "scale from zero",
                lambda: status(IDLE)["autoscaling"]["reason"] == "ScaleFromZero",
                REACTION_BOUND_S,
            )
            assert replicas(IDLE) == 1
            # ScalingActive is back, next to the other writer's condition.
            assert [c["type"] for c in status()["conditions"]] == ["Ready", "ScalingActive"]

            # The queue drains: no scale-down before the window has passed.
            queue.set(NAME, waiting=0, running=0)
            await wait_until(
                "low load seen",
                lambda: status()["autoscaling"]["observedWaiting"] == 0,
                EVALUATION_S + 3,
            )
            held_reasons: set[str] = set()

            def scaled_down() -> bool:
                held_reasons.add(status()["autoscaling"]["reason"])
                return replicas() < 4

            took = await wait_until("scale down", scaled_down, DOWN_WINDOW_S + 2 * EVALUATION_S)
            assert replicas() == 1
            # The last high recommendation was at most one interval before low load was seen.
            assert took >= DOWN_WINDOW_S - EVALUATION_S - 0.5
            assert "ScaleDownStabilization" in held_reasons

            # Prometheus goes away: the size is held and the condition says why.
            prometheus.stop()
            await wait_until(
                "ScalingActive=False",
                lambda: scaling_active()["status"] == "False",
                EVALUATION_S + 6,
            )
            assert scaling_active()["reason"] == "PrometheusUnreachable"
            assert replicas() == 1
            assert exported("grokserve_autoscaler_scaling_active") == 0

            # ... and comes back at the same address: scaling resumes by itself.
            prometheus.start()
            await wait_until(
                "ScalingActive=True",
                lambda: scaling_active()["status"] == "True",
                EVALUATION_S + 10,
            )
            assert scale_writes() == [4, 1]
            assert scale_writes(IDLE) == [1]

            # Turned off: the daemon stops and the condition says who owns the size now.
            gd_path = f"/apis/{RESOURCE.group}/{RESOURCE.version}/namespaces/{NAMESPACE}/{RESOURCE.plural}/{NAME}"
            await request(api, "PATCH", gd_path, {"spec": {"autoscaling": {"enabled": False}}})
            await wait_until(
                "ScalingActive=False AutoscalingDisabled",
                lambda: scaling_active()["reason"] == "AutoscalingDisabled",
                5,
            )
            assert scaling_active()["status"] == "False"
            assert exported("grokserve_autoscaler_desired_replicas") is None  # series dropped

        events = [obj.raw for (res, _, _), obj in api.objects.items() if res.plural == "events"]
        reasons = [e["reason"] for e in events if e["involvedObject"]["name"] == NAME]
        assert {"ScaleUp", "ScaleDown", "PrometheusUnreachable", "AutoscalingDisabled"} <= set(
            reasons
        )
        # One Event per transition: at the start and on recovery, not after every foreign write.
        assert reasons.count("ValidMetric") == 2
