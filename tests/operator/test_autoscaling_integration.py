"""The autoscaler end to end with real parts: a real Prometheus scraping a prometheus-client exporter
that the test drives, and the autoscaler daemon running in a real kopf operator against KMock."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import kmock
import kopf
import pytest
from kubernetes import client as k8s

from grokserve.operator.autoscaling import timer
from testkit.prometheus import PrometheusServer, ScrapeTarget, TestExporter

pytestmark = pytest.mark.slow

NAMESPACE, NAME = "llm", "grok-1"
RESOURCE = kmock.resource(timer.GROUP, timer.VERSION, timer.PLURAL)
SCRAPE_S, EVALUATION_S, DOWN_WINDOW_S = 1.0, 5, 12


def grok_deployment(prometheus_url: str) -> dict[str, Any]:
    return {
        "apiVersion": f"{timer.GROUP}/{timer.VERSION}",
        "kind": "GrokDeployment",
        "metadata": {
            "name": NAME,
            "namespace": NAMESPACE,
            "uid": "uid-1",
            "generation": 1,
            "resourceVersion": "1",
        },
        "spec": {
            "replicas": 1,
            "autoscaling": {
                "enabled": True,
                "minReplicas": 1,
                "maxReplicas": 4,
                "prometheusUrl": prometheus_url,
                "targetQueuePerReplica": 8,
                "scaleDownStabilizationSeconds": DOWN_WINDOW_S,
                "scaleDownLimit": 4,
                "evaluationIntervalSeconds": EVALUATION_S,
            },
        },
    }


@pytest.fixture
def exporter() -> Iterator[TestExporter]:
    with TestExporter() as test_exporter:
        yield test_exporter


@pytest.fixture
def prometheus(exporter: TestExporter) -> Iterator[PrometheusServer]:
    # The serving pods' namespace arrives as a target label, as Kubernetes service discovery adds it.
    with PrometheusServer([ScrapeTarget(exporter.address, {"namespace": NAMESPACE})]) as server:
        yield server


class Emulator(kmock.KubernetesEmulator):
    """KMock's emulator, plus `metadata.generateName` (kopf names its Events that way)."""

    async def _handle(self, request: kmock.Request) -> Any:
        metadata = request.data.get("metadata") if isinstance(request.data, dict) else None
        if request.method == "POST" and metadata and "generateName" in metadata:
            metadata.setdefault("name", f"{metadata['generateName']}{request.id}")
        return await super()._handle(request)


@pytest.fixture
async def api() -> AsyncIterator[kmock.KubernetesEmulator]:
    async with Emulator() as emulator, kmock.Server(emulator):
        emulator.resources[RESOURCE] = kmock.ResourceInfo(
            kind="GrokDeployment",
            namespaced=True,
            subresources={"status", "scale"},
            verbs={"get", "list", "watch", "patch", "update"},
        )
        # kopf waits for the namespaces resource to exist before it watches anything.
        emulator.resources["v1/namespaces"] = kmock.ResourceInfo(
            kind="Namespace", namespaced=False, verbs={"list", "watch"}
        )
        emulator.resources["v1/events"] = kmock.ResourceInfo(
            kind="Event", namespaced=True, verbs={"create"}
        )
        yield emulator


@contextlib.asynccontextmanager
async def running_operator(api: kmock.KubernetesEmulator) -> AsyncIterator[None]:
    registry = kopf.OperatorRegistry()
    url = str(api.url).rstrip("/")

    @kopf.on.login(registry=registry)
    def login(**_: Any) -> kopf.ConnectionInfo:
        return kopf.ConnectionInfo(server=url, insecure=True)

    timer.register(registry)
    previous = k8s.Configuration.get_default_copy()
    configuration = k8s.Configuration(host=url)
    k8s.Configuration.set_default(configuration)
    settings = kopf.OperatorSettings()
    settings.posting.level = 0
    stop = asyncio.Event()
    task = asyncio.create_task(
        kopf.operator(
            registry=registry,
            settings=settings,
            standalone=True,
            clusterwide=True,
            stop_flag=stop,
        )
    )
    try:
        yield
    finally:
        stop.set()
        try:
            await asyncio.wait_for(task, timeout=15)
        finally:
            k8s.Configuration.set_default(previous)


def current(api: kmock.KubernetesEmulator) -> dict[str, Any]:
    return api.objects[RESOURCE, NAMESPACE, NAME].raw


async def wait_until(
    what: str, predicate: Callable[[], bool], timeout_s: float, poll_s: float = 0.1
) -> float:
    """Seconds it took `predicate` to hold; fails the test with `what` after `timeout_s`."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout_s:
            pytest.fail(f"not within {timeout_s:g}s: {what}")
        await asyncio.sleep(poll_s)
    return time.monotonic() - started


async def test_queue_drives_replicas_through_scale_and_prometheus_loss_holds_them(
    exporter: TestExporter, prometheus: PrometheusServer, api: kmock.KubernetesEmulator
) -> None:
    waiting = exporter.gauge("grokserve_requests_waiting", "queued", ("deployment", "replica"))
    running = exporter.gauge("grokserve_requests_running", "running", ("deployment", "replica"))
    waiting.labels(NAME, "0").set(0)
    running.labels(NAME, "0").set(0)
    api.objects[RESOURCE, NAMESPACE, NAME] = grok_deployment(prometheus.url)
    # Prometheus hands out its first targets only ~5 s after start (discovery update period).
    prometheus.wait_for_targets_up(timeout_s=20)

    def autoscaling() -> dict[str, Any]:
        return current(api).get("status", {}).get("autoscaling", {})

    def replicas() -> int:
        return current(api)["spec"]["replicas"]

    def scaling_active() -> dict[str, Any]:
        conditions = current(api).get("status", {}).get("conditions", [])
        return next((c for c in conditions if c["type"] == "ScalingActive"), {})

    async with running_operator(api):
        await wait_until("a first evaluation", lambda: "reason" in autoscaling(), 10)
        assert replicas() == 1 and scaling_active()["status"] == "True"

        # 30 waiting at a target of 8 per replica → ceil(30 / 8) = 4 replicas.
        waiting.labels(NAME, "0").set(30)
        took = await wait_until("scale up to 4", lambda: replicas() == 4, 15)
        assert took <= SCRAPE_S + EVALUATION_S + 1.5
        scale_writes = [r for r in api if r.subresource == "scale" and r.method == "PATCH"]
        assert [r.data for r in scale_writes] == [{"spec": {"replicas": 4}}]
        assert autoscaling()["reason"] == "ScaleUp" and autoscaling()["lastScaleTime"]

        # The queue drains: no scale-down until the window has passed.
        waiting.labels(NAME, "0").set(0)
        await wait_until(
            "low load seen", lambda: autoscaling().get("observedWaiting") == 0, EVALUATION_S + 3
        )
        held_reasons: set[str] = set()

        def scaled_down() -> bool:
            held_reasons.add(autoscaling()["reason"])
            return replicas() < 4

        took = await wait_until("scale down", scaled_down, DOWN_WINDOW_S + 2 * EVALUATION_S)
        assert replicas() == 1
        assert took >= DOWN_WINDOW_S - EVALUATION_S - 0.5
        assert "ScaleDownStabilization" in held_reasons

        # Prometheus goes away: the size is held and the condition says why.
        prometheus.stop()
        await wait_until(
            "ScalingActive=False", lambda: scaling_active()["status"] == "False", EVALUATION_S + 6
        )
        assert scaling_active()["reason"] == "PrometheusUnreachable"
        assert replicas() == 1

        # ... and comes back: scaling resumes by itself.
        prometheus.start()
        await wait_until(
            "ScalingActive=True", lambda: scaling_active()["status"] == "True", EVALUATION_S + 10
        )

    reasons = {e["reason"] for (res, _, _), e in api.objects.items() if res.plural == "events"}
    assert {"ScaleUp", "ScaleDown", "PrometheusUnreachable"} <= reasons
