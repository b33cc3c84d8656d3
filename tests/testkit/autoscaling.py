"""A GrokDeployment under the autoscaler, with real parts: a prometheus-client exporter the caller
drives, a real Prometheus scraping it, and the autoscaler daemon in a real kopf operator against KMock.
Shared by tests/operator/test_autoscaling_integration.py and bench/autoscale.py."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import kmock
import kopf
from kubernetes import client as k8s
from prometheus_client import Gauge

from grokserve.operator.autoscaling import timer
from grokserve.operator.kube import Kube
from grokserve.operator.spec import API_GROUP, API_VERSION, PLURAL
from testkit.prometheus import PrometheusServer, ScrapeTarget, TestExporter

RESOURCE = kmock.resource(API_GROUP, API_VERSION, PLURAL)


class Emulator(kmock.KubernetesEmulator):
    """KMock's emulator, plus `metadata.generateName` (kopf names its Events that way), plus the
    monotonic arrival time, object name and replicas of every `/scale` write."""

    scale_writes: list[tuple[float, str, int]]

    async def _handle(self, request: kmock.Request) -> Any:
        metadata = request.data.get("metadata") if isinstance(request.data, dict) else None
        if request.method == "POST" and metadata and "generateName" in metadata:
            metadata.setdefault("name", f"{metadata['generateName']}{request.id}")
        if request.subresource == "scale" and request.method == "PATCH":
            write = (time.monotonic(), request.name, request.data["spec"]["replicas"])
            self.scale_writes.append(write)
        return await super()._handle(request)


@contextlib.asynccontextmanager
async def grokserve_api() -> AsyncIterator[Emulator]:
    """KMock serving the GrokDeployment resource (with status and scale) plus what kopf needs."""
    emulator = Emulator()
    emulator.scale_writes = []
    async with emulator, kmock.Server(emulator):
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


def grok_deployment(
    namespace: str, name: str, replicas: int, autoscaling: dict[str, Any]
) -> dict[str, Any]:
    """Only what the autoscaler reads: spec.replicas and spec.autoscaling."""
    return {
        "apiVersion": f"{API_GROUP}/{API_VERSION}",
        "kind": "GrokDeployment",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "uid": f"uid-{namespace}-{name}",
            "generation": 1,
            "resourceVersion": "1",
        },
        "spec": {"replicas": replicas, "autoscaling": {"enabled": True, **autoscaling}},
    }


@contextlib.asynccontextmanager
async def running_operator(api: kmock.KubernetesEmulator) -> AsyncIterator[None]:
    """kopf with only the autoscaler registered, talking to `api`; stopped on exit."""
    registry = kopf.OperatorRegistry()
    url = str(api.url).rstrip("/")

    @kopf.on.login(registry=registry)
    def login(**_: Any) -> kopf.ConnectionInfo:
        return kopf.ConnectionInfo(server=url, insecure=True)

    timer.register(registry)
    # The autoscaler writes /scale and /status through the operator's client, as in production.
    memo = kopf.Memo(kube=Kube(k8s.ApiClient(k8s.Configuration(host=url))))
    settings = kopf.OperatorSettings()
    settings.posting.level = 0  # post every Event, Normal ones included
    stop = asyncio.Event()
    task = asyncio.create_task(
        kopf.operator(
            registry=registry,
            settings=settings,
            memo=memo,
            standalone=True,
            clusterwide=True,
            stop_flag=stop,
        )
    )
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=15)


class QueueExporter:
    """The serving metrics the autoscaler reads, per deployment, set by hand."""

    def __init__(self, exporter: TestExporter, deployments: tuple[str, ...]) -> None:
        labels = ("deployment", "replica")
        self._waiting: Gauge = exporter.gauge("grokserve_requests_waiting", "queued", labels)
        self._running: Gauge = exporter.gauge("grokserve_requests_running", "running", labels)
        for deployment in deployments:
            self.set(deployment, waiting=0, running=0)

    def set(self, deployment: str, waiting: float, running: float = 0) -> None:
        self._waiting.labels(deployment, "0").set(waiting)
        self._running.labels(deployment, "0").set(running)


def scraping(exporter: TestExporter, namespace: str) -> PrometheusServer:
    """A (not yet started) Prometheus scraping `exporter`; the namespace arrives as a target label,
    as Kubernetes service discovery adds it for the serving pods."""
    return PrometheusServer([ScrapeTarget(exporter.address, {"namespace": namespace})])


async def wait_until(
    what: str, predicate: Callable[[], bool], timeout_s: float, poll_s: float = 0.05
) -> float:
    """Seconds it took `predicate` to hold; TimeoutError naming `what` after `timeout_s`."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout_s:
            raise TimeoutError(f"not within {timeout_s:g}s: {what}")
        await asyncio.sleep(poll_s)
    return time.monotonic() - started
