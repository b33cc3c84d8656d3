"""The per-GrokDeployment autoscaler loop, run by kopf as a daemon while autoscaling.enabled is true.

A daemon rather than a `@kopf.timer`: the evaluation interval is per deployment (a spec field) and may
change at runtime, and the policy's stabilization history must live as long as the loop does. Each
evaluation: read the spec (live body), query Prometheus, decide, write `spec.replicas` through the
`/scale` subresource when the size changes, then record the decision in `status.autoscaling`, the
`ScalingActive` condition, an Event (on size changes and condition changes only, not every tick) and
metrics.
"""

from __future__ import annotations

import asyncio
import datetime
from collections.abc import Mapping
from typing import Any

import aiohttp
import kopf
from kubernetes import client as k8s
from pydantic import ValidationError

from grokserve.operator.autoscaling import metrics
from grokserve.operator.autoscaling.policy import (
    Decision,
    MetricFailure,
    PolicyConfig,
    ScalingPolicy,
)
from grokserve.operator.autoscaling.prometheus import PrometheusClient, QueryTemplateError
from grokserve.operator.spec import AutoscalingSpec

GROUP, VERSION, PLURAL = "grokserve.io", "v1alpha1", "grokdeployments"
CONDITION = "ScalingActive"
# Prometheus gets this share of the evaluation interval (at most 10 s) to answer both queries.
QUERY_TIMEOUT_SHARE, QUERY_TIMEOUT_MAX_S = 0.5, 10.0


def policy_config(spec: AutoscalingSpec) -> PolicyConfig:
    return PolicyConfig(
        min_replicas=spec.min_replicas,
        max_replicas=spec.max_replicas,
        target_queue_per_replica=spec.target_queue_per_replica,
        tolerance=spec.tolerance,
        scale_up_stabilization_s=spec.scale_up_stabilization_seconds,
        scale_down_stabilization_s=spec.scale_down_stabilization_seconds,
        scale_up_max_step=spec.scale_up_limit,
        scale_down_max_step=spec.scale_down_limit,
        idle_window_s=spec.scale_to_zero_idle_seconds,
    )


def autoscaling_enabled(spec: Mapping[str, Any], **_: Any) -> bool:
    autoscaling = spec.get("autoscaling") or {}
    return bool(autoscaling.get("enabled"))


def register(registry: kopf.OperatorRegistry) -> None:
    """Add the autoscaler daemon to an operator's registry (the operator calls this once)."""
    kopf.daemon(
        GROUP,
        VERSION,
        PLURAL,
        id="autoscaler",
        when=autoscaling_enabled,
        cancellation_timeout=5.0,
        registry=registry,
    )(autoscale)


async def autoscale(
    name: str,
    namespace: str,
    body: kopf.Body,
    stopped: kopf.DaemonStopped,
    logger: kopf.Logger,
    **_: Any,
) -> None:
    policy: ScalingPolicy | None = None
    loop = asyncio.get_running_loop()
    try:
        async with aiohttp.ClientSession() as session:
            while not stopped:
                try:
                    autoscaling = AutoscalingSpec.model_validate(body["spec"].get("autoscaling"))
                except ValidationError as error:
                    # The operator's reconcile handler reports invalid specs; just wait for a fix.
                    logger.warning(f"autoscaler idle: invalid spec.autoscaling: {error}")
                    await stopped.wait(30)
                    continue
                config = policy_config(autoscaling)
                if policy is None:
                    policy = ScalingPolicy(config)
                policy.config = config
                interval = float(autoscaling.evaluation_interval_seconds)
                decision = await evaluate(
                    policy, session, autoscaling, body, namespace, name, loop.time(), interval
                )
                await apply(decision, body, namespace, name, logger)
                await stopped.wait(interval)
    finally:
        metrics.forget(namespace, name)


async def evaluate(
    policy: ScalingPolicy,
    session: aiohttp.ClientSession,
    autoscaling: AutoscalingSpec,
    body: kopf.Body,
    namespace: str,
    name: str,
    now: float,
    interval_s: float,
) -> Decision:
    assert autoscaling.prometheus_url is not None  # the spec requires it when enabled
    timeout = min(interval_s * QUERY_TIMEOUT_SHARE, QUERY_TIMEOUT_MAX_S)
    prometheus = PrometheusClient(autoscaling.prometheus_url, session, timeout_s=timeout)
    try:
        sample = await prometheus.queue_sample(namespace, name, autoscaling.query)
    except QueryTemplateError as error:
        sample = MetricFailure("InvalidQuery", str(error))
    current = int(body["spec"].get("replicas", 1))
    # Without a status yet there is no evidence of loading replicas: count them all as ready.
    ready = int((body.get("status") or {}).get("readyReplicas", current))
    return policy.decide(now, current, ready, sample)


async def apply(
    decision: Decision, body: kopf.Body, namespace: str, name: str, logger: kopf.Logger
) -> None:
    now = _timestamp()
    status = body.get("status") or {}
    if decision.changes:
        await asyncio.to_thread(write_scale, namespace, name, decision.replicas)
        logger.info(f"autoscaler: {decision.reason}: {decision.message}")
        kopf.info(body, reason=decision.reason, message=decision.message)
    previous = _condition(status)
    condition = _next_condition(previous, decision, now)
    if condition["status"] != previous.get("status") or condition["reason"] != previous.get(
        "reason"
    ):
        post = kopf.info if decision.scaling_active else kopf.warn
        post(body, reason=decision.reason, message=decision.message)
    last_scale = now if decision.changes else (status.get("autoscaling") or {}).get("lastScaleTime")
    record = {
        "observedWaiting": decision.observed_waiting,
        "observedPerReplica": decision.observed_per_replica,
        "recommendation": decision.recommendation,
        "desiredReplicas": decision.replicas,
        "lastEvaluationTime": now,
        "lastScaleTime": last_scale,
        "reason": decision.reason,
        "message": decision.message,
    }
    conditions = [c for c in status.get("conditions") or [] if c.get("type") != CONDITION]
    await asyncio.to_thread(
        write_status,
        namespace,
        name,
        {"autoscaling": record, "conditions": [*conditions, condition]},
    )
    metrics.record(namespace, name, decision)


def write_scale(namespace: str, name: str, replicas: int) -> None:
    """PATCH the /scale subresource: the same door `kubectl scale`, the HPA and KEDA use."""
    k8s.CustomObjectsApi().patch_namespaced_custom_object_scale(
        GROUP, VERSION, namespace, PLURAL, name, {"spec": {"replicas": replicas}}
    )


def write_status(namespace: str, name: str, status: dict[str, Any]) -> None:
    k8s.CustomObjectsApi().patch_namespaced_custom_object_status(
        GROUP, VERSION, namespace, PLURAL, name, {"status": status}
    )


def _condition(status: Mapping[str, Any]) -> Mapping[str, Any]:
    for condition in status.get("conditions") or []:
        if condition.get("type") == CONDITION:
            return condition
    return {}


def _next_condition(previous: Mapping[str, Any], decision: Decision, now: str) -> dict[str, Any]:
    status = "True" if decision.scaling_active else "False"
    return {
        "type": CONDITION,
        "status": status,
        "reason": decision.reason if not decision.scaling_active else "ValidMetric",
        "message": decision.message,
        "lastTransitionTime": (
            previous["lastTransitionTime"]
            if previous.get("status") == status and "lastTransitionTime" in previous
            else now
        ),
    }


def _timestamp() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
