"""Fixtures and helpers for running the operator against the KMock API server (`kmock_api`)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any, TypeVar

import pytest
import yaml

from grokserve.operator.spec import API_GROUP, PLURAL
from testkit import managed_fields
from testkit.kmock_api import KubeApi, KubeApiThread, running_kube_api

REPO = Path(__file__).resolve().parents[2]
GROKDEPLOYMENTS = "/apis/grokserve.io/v1alpha1"
CLUSTERROLE = REPO / "manifests" / "rbac" / "clusterrole.yaml"
T = TypeVar("T")
# What kopf peering needs (the chart's peering ClusterRole; test_operator_chart.py checks it).
PEERING_GRANTS = {
    ("kopf.dev", "clusterkopfpeerings", verb) for verb in ("get", "list", "watch", "patch")
}

# Enough of KubeRay's CRD for discovery: the operator only needs ray.io/v1 rayservices served.
KUBERAY_CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "rayservices.ray.io"},
    "spec": {
        "group": "ray.io",
        "scope": "Namespaced",
        "names": {"kind": "RayService", "plural": "rayservices", "singular": "rayservice"},
        "versions": [
            {"name": "v1", "served": True, "storage": True, "subresources": {"status": {}}}
        ],
    },
}

SERVICEMONITOR_CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "servicemonitors.monitoring.coreos.com"},
    "spec": {
        "group": "monitoring.coreos.com",
        "scope": "Namespaced",
        "names": {
            "kind": "ServiceMonitor",
            "plural": "servicemonitors",
            "singular": "servicemonitor",
        },
        "versions": [{"name": "v1", "served": True, "storage": True}],
    },
}


def refusing(
    method: str, plural: str, status: int, message: str, subresource: str | None = None
) -> Callable[[str, Any, str | None, Any], tuple[int, str] | None]:
    """An admission hook for KMock that refuses one kind of request, as a webhook or RBAC would."""

    def hook(
        request_method: str, resource: Any, request_subresource: str | None, body: Any
    ) -> tuple[int, str] | None:
        if (request_method, resource.plural, request_subresource) == (method, plural, subresource):
            return status, message
        return None

    return hook


def wait_until(
    probe: Callable[[], T | None],
    timeout: float = 30,
    what: str = "condition",
    interval: float = 0.1,
) -> T:
    """Poll `probe` every `interval` seconds until it returns something truthy; fail with `what`
    after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}; last value: {last!r}")


class Client:
    """A tiny JSON client for tests (no kubernetes client: it caches $KUBECONFIG at import)."""

    def __init__(self, url: str) -> None:
        self.url = url

    def request(
        self, method: str, path: str, body: Any = None, content_type: str = "application/json"
    ) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(req, timeout=10) as response:
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as error:
            if error.code == 404:
                return None
            raise

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def create(self, path: str, body: dict[str, Any]) -> Any:
        return self.request("POST", path, body)

    def merge_patch(self, path: str, body: dict[str, Any]) -> Any:
        return self.request("PATCH", path, body, "application/merge-patch+json")

    def delete(self, path: str) -> Any:
        return self.request("DELETE", path)

    def install_crds(self, *, kuberay: bool) -> None:
        crd_path = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"
        self.create(
            crd_path, yaml.safe_load((REPO / "manifests/crd/grokdeployments.yaml").read_text())
        )
        if kuberay:
            self.create(crd_path, KUBERAY_CRD)


@pytest.fixture
def kube(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[KubeApiThread, Client]]:
    """A KMock API server, with $KUBECONFIG pointing at it for kopf, the operator and kubectl."""
    with running_kube_api() as server:
        monkeypatch.setenv("KUBECONFIG", str(server.write_kubeconfig(tmp_path / "kubeconfig")))
        yield server, Client(server.url)


@contextlib.contextmanager
def running_operator(
    timeout: float = 60, modules: tuple[str, ...] = ("grokserve.operator.handlers",)
) -> Iterator[Any]:
    """kopf handlers of `modules` in a KopfRunner thread (standalone, all namespaces); a failed
    assertion inside the block gets the operator's log appended to its message."""
    from kopf.testing import KopfRunner

    args = ["run", "--standalone", "--all-namespaces", "--verbose"]
    for module in modules:
        args += ["-m", module]
    failure: AssertionError | None = None
    with KopfRunner(args, timeout=timeout) as runner:
        try:
            yield runner
        except AssertionError as error:
            failure = error
    if failure is not None:
        # A test waited in vain: show what the operator was doing.
        raise AssertionError(f"{failure}\n--- operator log ---\n{runner.output[-5000:]}") from None
    assert runner.exception is None, runner.output


def operator_subprocess(out: IO[str], *flags: str) -> subprocess.Popen[bytes]:
    """`grokserve operator` in a child process with `flags` (metrics and health on free ports),
    writing its log to `out`."""
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "grokserve.cli",
            "operator",
            "--metrics-port=0",
            "--health-port=0",
            *flags,
        ],
        stdout=out,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONSAFEPATH": "1"},
    )


def clusterrole_grants(path: Path = CLUSTERROLE) -> set[tuple[str, str, str]]:
    """(apiGroup, resource, verb) for every permission the operator's ClusterRole grants."""
    rules = yaml.safe_load(path.read_text())["rules"]
    return {
        (group, resource, verb)
        for rule in rules
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


def _verb_of(method: str, params: dict[str, Any], named: bool) -> str:
    if method == "GET":
        return "get" if named else ("watch" if params.get("watch") in ("true", "1") else "list")
    return {"POST": "create", "PATCH": "patch", "PUT": "update", "DELETE": "delete"}[method]


def _sets_blocking_owner_reference(body: Any) -> bool:
    metadata = body.get("metadata") if isinstance(body, dict) else None
    references = (metadata or {}).get("ownerReferences") or []
    return any(ref.get("blockOwnerDeletion") for ref in references)


def operator_requests(api: KubeApi) -> set[tuple[str, str, str]]:
    """(apiGroup, resource, verb) of every request the KMock server got from anyone but the tests'
    own `Client`: what RBAC must grant the operator. Call it through `KubeApiThread.call`.

    Also what the real API server checks beyond the verb itself: a server-side apply needs
    `create` as well (it creates a missing object), and setting an ownerReference with
    blockOwnerDeletion needs `update` on the owner's finalizers (OwnerReferencesPermissionEnforcement).
    """
    used = set()
    for request in api:
        if request.resource is None or request.resource.plural is None:
            continue  # discovery (/api, /apis/...) is open to every authenticated user
        if request.headers.get("User-Agent", "").startswith("Python-urllib"):
            continue  # the test's own client
        resource = request.resource.plural + (
            f"/{request.subresource}" if request.subresource else ""
        )
        verb = _verb_of(request.method.value.upper(), request.params, request.name is not None)
        used.add((request.resource.group, resource, verb))
        if verb == "patch" and managed_fields.is_apply(request.headers):
            used.add((request.resource.group, resource, "create"))
        if verb in ("create", "patch", "update") and _sets_blocking_owner_reference(request.data):
            used.add((API_GROUP, f"{PLURAL}/finalizers", "update"))
    return used


def rayservice_status(
    generation: int, ready_workers: int, app: str = "RUNNING", name: str = "grok-1"
) -> dict:
    """A RayService status as KubeRay writes it once application `name` has reached `app` on a
    cluster with `ready_workers` ready workers."""
    return {
        "observedGeneration": generation,
        "activeServiceStatus": {
            "applicationStatuses": {
                name: {
                    "status": app,
                    "serveDeploymentStatuses": {"GrokReplica": {"status": "HEALTHY"}},
                }
            },
            "rayClusterStatus": {"readyWorkerReplicas": ready_workers},
        },
    }
