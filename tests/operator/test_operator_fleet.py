"""Reconcile on change: events start passes, the resync writes nothing when nothing differs."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml
from prometheus_client import REGISTRY

from grokserve.operator import handlers
from testkit.kmock_api import KubeApi
from testkit.operator_env import (
    GROKDEPLOYMENTS,
    kube,
    rayservice_status,
    running_operator,
    wait_until,
)

__all__ = ["kube"]  # the fixture, re-exported for pytest

pytestmark = pytest.mark.timeout(120)

EXAMPLE = Path(__file__).resolve().parents[2] / "manifests" / "examples" / "grok-tiny-cpu.yaml"
NS = "fleet"
NAME = "grok-tiny"
GD = f"{GROKDEPLOYMENTS}/namespaces/{NS}/grokdeployments"
CHILDREN = (
    f"/apis/ray.io/v1/namespaces/{NS}/rayservices/{NAME}",
    f"/api/v1/namespaces/{NS}/services/{NAME}",
    f"/api/v1/namespaces/{NS}/configmaps/{NAME}-serving",
    f"/apis/policy/v1/namespaces/{NS}/poddisruptionbudgets/{NAME}",
)


def example() -> dict:
    body = yaml.safe_load(EXAMPLE.read_text())
    body["metadata"]["namespace"] = NS
    return body


def passes() -> float:
    labels = {"outcome": "ok"}
    return REGISTRY.get_sample_value("grokdeployment_reconcile_duration_seconds_count", labels) or 0


def operator_writes(api: KubeApi) -> list[str]:
    """Every write the API server got from anyone but the tests' own client."""
    return [
        f"{request.method.value.upper()} {request.url.path}"
        for request in api
        if request.method.value.upper() != "GET"
        and not request.headers.get("User-Agent", "").startswith("Python-urllib")
    ]


def reconciled(api, generation: int = 1) -> dict | None:
    body = api.get(f"{GD}/{NAME}")
    status = (body or {}).get("status") or {}
    if status.get("observedGeneration") != generation or not all(map(api.get, CHILDREN)):
        return None
    return body


def test_an_unchanged_grokdeployment_is_not_written_over_several_resync_periods(
    kube, monkeypatch: pytest.MonkeyPatch
) -> None:
    server, api = kube
    api.install_crds(kuberay=True)
    monkeypatch.setattr(handlers, "RESYNC_SECONDS", 0.3)
    with running_operator():
        api.create(GD, example())
        wait_until(lambda: reconciled(api), what="children and a status")
        time.sleep(0.5)  # the watch events of the operator's own writes come back
        stored = {path: api.get(path) for path in (f"{GD}/{NAME}", *CHILDREN)}
        writes = server.call(operator_writes)
        resynced = passes()
        wait_until(lambda: passes() >= resynced + 5, what="five resync passes")
        assert server.call(operator_writes) == writes
        assert {path: api.get(path) for path in stored} == stored


def test_a_rayservice_status_change_reaches_the_status_within_a_second(
    kube, monkeypatch: pytest.MonkeyPatch
) -> None:
    _server, api = kube
    api.install_crds(kuberay=True)
    monkeypatch.setattr(handlers, "RESYNC_SECONDS", 3600)  # only the event can bring it
    with running_operator():
        api.create(GD, example())
        wait_until(lambda: reconciled(api), what="children and a status")
        rayservice = api.get(CHILDREN[0])
        serving = rayservice_status(rayservice["metadata"]["generation"], 1, name=NAME)
        reported = time.monotonic()
        api.merge_patch(f"{CHILDREN[0]}/status", {"status": serving})
        body = wait_until(
            lambda: (b := api.get(f"{GD}/{NAME}"))["status"].get("readyReplicas") == 1 and b,
            timeout=5,
            what="readyReplicas 1",
        )
        took = time.monotonic() - reported
    ready = next(c for c in body["status"]["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "True"
    assert took < 1.0, f"the status followed the RayService after {took:.2f} s"


def test_a_child_deleted_or_edited_by_someone_else_is_repaired_without_a_resync(
    kube, monkeypatch: pytest.MonkeyPatch
) -> None:
    _server, api = kube
    api.install_crds(kuberay=True)
    monkeypatch.setattr(handlers, "RESYNC_SECONDS", 3600)
    service = CHILDREN[1]
    with running_operator():
        api.create(GD, example())
        wait_until(lambda: reconciled(api), what="children and a status")
        uid = api.get(service)["metadata"]["uid"]
        api.delete(service)
        wait_until(
            lambda: (s := api.get(service)) and s["metadata"]["uid"] != uid, what="a new Service"
        )
        ports = api.get(service)["spec"]["ports"]
        api.merge_patch(service, {"spec": {"ports": [{"name": "http", "port": 9999}]}})
        wait_until(lambda: api.get(service)["spec"]["ports"] == ports, what="the ports back")
