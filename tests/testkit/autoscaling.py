"""A GrokDeployment under the autoscaler, with real parts: a prometheus-client exporter the caller
drives, a real Prometheus scraping it, and the autoscaler daemon in a real kopf operator against KMock.
Shared by tests/operator/test_autoscaling_integration.py and bench/autoscale.py."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import kmock
import kopf
import yaml
from kubernetes import client as k8s
from prometheus_client import Gauge

from grokserve.operator.autoscaling import daemon
from grokserve.operator.kube import Kube
from grokserve.operator.spec import API_GROUP, API_VERSION, PLURAL
from testkit.kmock_api import KubeApi
from testkit.prometheus import PrometheusServer, ScrapeTarget, TestExporter

RESOURCE = kmock.resource(API_GROUP, API_VERSION, PLURAL)
CRD_FILE = Path(__file__).resolve().parents[2] / "manifests" / "crd" / "grokdeployments.yaml"
CRD_PATH = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"


class RecordingKubeApi(KubeApi):
    """The project's KMock API server, plus the arrival time, object name and replicas of every
    `/scale` write (what the benchmark measures and the tests count)."""

    scale_writes: list[tuple[float, str, int]]

    async def _handle(self, request: kmock.Request) -> Any:
        if request.subresource == "scale" and request.method == "PATCH":
            write = (time.monotonic(), request.name, request.data["spec"]["replicas"])
            self.scale_writes.append(write)
        return await super()._handle(request)


@contextlib.asynccontextmanager
async def grokserve_api() -> AsyncIterator[RecordingKubeApi]:
    """The KMock API server on this event loop, with the GrokDeployment CRD installed."""
    api = RecordingKubeApi()
    api.scale_writes = []
    async with api, kmock.Server(api):
        await request(api, "POST", CRD_PATH, yaml.safe_load(CRD_FILE.read_text()))
        yield api


async def request(api: KubeApi, method: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
    """A JSON request to the API server. Async, unlike testkit.operator_env.Client: here the server
    runs on the test's own event loop, which a blocking client would stall."""
    async with api.request(method, path, json=body) as response:
        answer = await response.json()
        if response.status >= 300:
            raise RuntimeError(f"{method} {path}: HTTP {response.status}: {answer}")
        return answer


async def create_grok_deployment(
    api: KubeApi, namespace: str, name: str, replicas: int, autoscaling: dict[str, Any]
) -> None:
    """A GrokDeployment with what the autoscaler reads: spec.replicas and spec.autoscaling."""
    body = {
        "apiVersion": f"{API_GROUP}/{API_VERSION}",
        "kind": "GrokDeployment",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"replicas": replicas, "autoscaling": {"enabled": True, **autoscaling}},
    }
    path = f"/apis/{API_GROUP}/{API_VERSION}/namespaces/{namespace}/{PLURAL}"
    await request(api, "POST", path, body)


@contextlib.asynccontextmanager
async def running_operator(api: KubeApi) -> AsyncIterator[None]:
    """kopf with only the autoscaler registered, talking to `api`; stopped on exit."""
    registry = kopf.OperatorRegistry()
    url = str(api.url).rstrip("/")

    @kopf.on.login(registry=registry)
    def login(**_: Any) -> kopf.ConnectionInfo:
        return kopf.ConnectionInfo(server=url, insecure=True)

    daemon.register(registry)
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
