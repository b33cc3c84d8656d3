"""The per-GrokDeployment autoscaler loop, run by kopf as a daemon while autoscaling.enabled is true.

A daemon rather than a `@kopf.timer`: the evaluation interval is per deployment (a spec field) and may
change at runtime, and the policy's stabilization history must live as long as the loop does. Each
evaluation: read the spec (the daemon's body is kept fresh by kopf), query Prometheus, decide, write
`spec.replicas` through the `/scale` subresource when the size changes, then record the decision in
`status.autoscaling`, the `ScalingActive` condition, an Event (on size changes and condition changes,
not every tick) and metrics. API calls go through the operator's `memo.kube` client.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import aiohttp
import kopf
import urllib3
from kubernetes.client.rest import ApiException
from pydantic import ValidationError

from grokserve.operator.autoscaling import metrics
from grokserve.operator.autoscaling.policy import (
    Decision,
    MetricFailure,
    PolicyConfig,
    QueueSample,
    ScalingPolicy,
)
from grokserve.operator.autoscaling.prometheus import PrometheusClient, QueryTemplateError
from grokserve.operator.kube import GROKDEPLOYMENT, Kube, api_message
from grokserve.operator.spec import API_GROUP, API_VERSION, PLURAL, AutoscalingSpec
from grokserve.operator.status import now_rfc3339

CONDITION = "ScalingActive"
DISABLED = "AutoscalingDisabled"
SCALE_FAILED = "ScaleFailed"
INVALID_INPUT = "InvalidScalingInput"
# Prometheus gets this share of the evaluation interval (at most 10 s) to answer both queries.
QUERY_TIMEOUT_SHARE, QUERY_TIMEOUT_MAX_S = 0.5, 10.0
# How long to wait before looking again at a spec.autoscaling that does not validate.
INVALID_SPEC_RETRY_S = 30.0
STOP_GRACE_S = 10.0


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
        API_GROUP,
        API_VERSION,
        PLURAL,
        id="autoscaler",
        when=autoscaling_enabled,
        # Asked to stop, the loop leaves at once but may finish a tick and write the disabled
        # condition: give it a graceful period before kopf cancels it.
        cancellation_backoff=STOP_GRACE_S,
        cancellation_timeout=STOP_GRACE_S,
        registry=registry,
        # kopf's handler type allows namespace None (cluster-scoped resources); a GrokDeployment is
        # namespaced, so kopf always passes a str.
    )(autoscale)  # type: ignore[arg-type]


async def autoscale(
    name: str,
    namespace: str,
    body: kopf.Body,
    memo: kopf.Memo,
    stopped: kopf.DaemonStopped,
    logger: kopf.Logger,
    **_: Any,
) -> None:
    autoscaler = Autoscaler(namespace, name, body, memo.kube, logger)
    try:
        # No DNS cache: aiohttp resolves cached hosts in a task of its own that outlives a
        # cancelled request, and kopf re-raises such a stray task's error when the operator exits.
        connector = aiohttp.TCPConnector(use_dns_cache=False)
        async with aiohttp.ClientSession(connector=connector) as session:
            while not stopped:
                interval = await autoscaler.tick(session)
                await stopped.wait(interval)
    finally:
        metrics.forget(namespace, name)
    # Stopped because spec.autoscaling.enabled turned false (not for a deletion or an operator
    # exit): say so, or ScalingActive would claim forever that a stopped autoscaler is active.
    if stopped.reason is not None and stopped.reason & kopf.DaemonStoppingReason.FILTERS_MISMATCH:
        await autoscaler.disabled()


class Autoscaler:
    """The state of one deployment's autoscaler between ticks: the policy and its last condition."""

    def __init__(
        self,
        namespace: str,
        name: str,
        body: kopf.Body,
        kube: Kube,
        logger: kopf.Logger,
    ) -> None:
        self.namespace = namespace
        self.name = name
        self.body = body
        self.kube = kube
        self.logger = logger
        self.policy: ScalingPolicy | None = None
        # Kept here, not re-read from status: another writer replacing status.conditions must not
        # make every tick look like a transition (and post an Event).
        self.condition: Mapping[str, Any] = _find_condition(body.get("status") or {})
        self.last_scale_time: str | None = (
            (body.get("status") or {}).get("autoscaling") or {}
        ).get("lastScaleTime")

    async def tick(self, session: aiohttp.ClientSession) -> float:
        """One evaluation; returns the seconds to wait before the next one."""
        try:
            spec = AutoscalingSpec.model_validate(self.body["spec"].get("autoscaling"))
        except ValidationError as error:
            # The reconcile handler reports an invalid spec in the Ready condition; wait for a fix.
            self.logger.warning(f"autoscaler idle: invalid spec.autoscaling: {error}")
            return INVALID_SPEC_RETRY_S
        interval = float(spec.evaluation_interval_seconds)
        current = int(self.body["spec"].get("replicas", 1))  # the CRD's schema: an integer
        try:
            # Without a status yet there is no evidence of loading replicas: count them all as
            # ready. (The status is not schema-checked: a readyReplicas that is no count is held.)
            ready = int((self.body.get("status") or {}).get("readyReplicas", current))
            config = policy_config(spec)
            if self.policy is None:
                self.policy = ScalingPolicy(config)
            self.policy.config = config
            sample = await self._sample(
                session, spec, min(interval * QUERY_TIMEOUT_SHARE, QUERY_TIMEOUT_MAX_S)
            )
            decision = self.policy.decide(asyncio.get_running_loop().time(), current, ready, sample)
        except (ValueError, ArithmeticError) as error:
            # Numbers the policy cannot act on: hold the size and say why, rather than let the
            # daemon fail and be restarted into the same error.
            decision = Decision(
                current=current,
                replicas=current,
                reason=INVALID_INPUT,
                message=f"holding {current} replicas: {error}",
                scaling_active=False,
            )
        try:
            await self._apply(decision)
        except (ApiException, urllib3.exceptions.HTTPError) as error:
            # The next tick decides afresh from the then-current size; nothing is lost by waiting.
            self.logger.error(f"autoscaler: writing {decision.reason} failed: {error}")
        return interval

    async def _sample(
        self, session: aiohttp.ClientSession, spec: AutoscalingSpec, timeout_s: float
    ) -> QueueSample | MetricFailure:
        assert spec.prometheus_url is not None  # the spec requires it when enabled
        prometheus = PrometheusClient(spec.prometheus_url, session, timeout_s=timeout_s)
        try:
            return await prometheus.queue_sample(self.namespace, self.name, spec.query)
        except QueryTemplateError as error:
            return MetricFailure("InvalidQuery", str(error))

    async def _apply(self, decision: Decision) -> None:
        now = now_rfc3339()
        if decision.changes:
            try:
                await asyncio.to_thread(self._write_scale, decision.replicas)
            except ApiException as error:
                # Refused (RBAC, an admission webhook) or failed: the size stays, and status,
                # condition, Event and metrics say so instead of claiming the scale happened.
                decision = scale_failed(decision, error)
            else:
                self.last_scale_time = now
                self.logger.info(f"autoscaler: {decision.reason}: {decision.message}")
                kopf.info(self.body, reason=decision.reason, message=decision.message)
        # Metrics describe the decision, so they are recorded even if the status write fails.
        metrics.record(self.namespace, self.name, decision)
        condition = _next_condition(self.condition, decision, now, self._generation())
        if (condition["status"], condition["reason"]) != (
            self.condition.get("status"),
            self.condition.get("reason"),
        ):
            post = kopf.info if decision.scaling_active else kopf.warn
            post(self.body, reason=condition["reason"], message=decision.message)
        self.condition = condition
        record = {
            "observedWaiting": decision.observed_waiting,
            "observedPerReplica": decision.observed_per_replica,
            "recommendation": decision.recommendation,
            "desiredReplicas": decision.replicas,
            "lastEvaluationTime": now,
            "lastScaleTime": self.last_scale_time,
            "reason": decision.reason,
            "message": decision.message,
        }
        await asyncio.to_thread(self._write_status, condition, record)

    async def disabled(self) -> None:
        message = (
            "spec.autoscaling.enabled is false: spec.replicas is left to kubectl scale, "
            "an HPA or KEDA"
        )
        condition = {
            "type": CONDITION,
            "status": "False",
            "reason": DISABLED,
            "message": message,
            "observedGeneration": self._generation(),
            "lastTransitionTime": now_rfc3339(),
        }
        try:
            await asyncio.to_thread(self._write_status, condition, None)
        except (ApiException, urllib3.exceptions.HTTPError) as error:
            self.logger.error(f"autoscaler: recording that it is disabled failed: {error}")
            return
        kopf.info(self.body, reason=DISABLED, message=message)

    def _generation(self) -> int | None:
        """The generation of the spec this evaluation read (kopf keeps the daemon's body fresh)."""
        return self.body["metadata"].get("generation")

    def _write_scale(self, replicas: int) -> None:
        """PATCH the /scale subresource: the same door `kubectl scale`, the HPA and KEDA use."""
        self.kube.scale(GROKDEPLOYMENT, self.namespace, self.name, replicas)

    def _write_status(self, condition: dict[str, Any], record: dict[str, Any] | None) -> None:
        """Set our condition (and status.autoscaling), keeping the other writers' conditions."""

        def ours(stored: dict[str, Any]) -> dict[str, Any]:
            status = stored.get("status") or {}
            conditions = [c for c in status.get("conditions") or [] if c.get("type") != CONDITION]
            changes: dict[str, Any] = {"conditions": [*conditions, condition]}
            if record is not None:
                changes["autoscaling"] = record
            return changes

        try:
            self.kube.update_status(GROKDEPLOYMENT, self.namespace, self.name, ours)
        except ApiException as error:
            if error.status not in (409, 422):
                raise
            self.logger.warning("autoscaler: status not written (the object kept changing)")


def scale_failed(decision: Decision, error: ApiException) -> Decision:
    """The decision as it turned out when the API server did not take its /scale write."""
    message = (
        f"{decision.reason} to {decision.replicas} replica(s) not applied: writing "
        f"spec.replicas through /scale failed: {api_message(error)} (HTTP {error.status})"
    )
    return replace(
        decision,
        replicas=decision.current,
        reason=SCALE_FAILED,
        message=message,
        scaling_active=False,
    )


def _find_condition(status: Mapping[str, Any]) -> Mapping[str, Any]:
    for condition in status.get("conditions") or []:
        if condition.get("type") == CONDITION:
            return condition
    return {}


def _next_condition(
    previous: Mapping[str, Any], decision: Decision, now: str, generation: int | None
) -> dict[str, Any]:
    status = "True" if decision.scaling_active else "False"
    return {
        "type": CONDITION,
        "status": status,
        "reason": "ValidMetric" if decision.scaling_active else decision.reason,
        "message": decision.message,
        "observedGeneration": generation,
        "lastTransitionTime": (
            previous["lastTransitionTime"]
            if previous.get("status") == status and "lastTransitionTime" in previous
            else now
        ),
    }
