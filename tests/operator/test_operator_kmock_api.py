"""The KMock API-server subclass behaves like an API server where kopf and kubectl depend on it."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

from testkit.operator_env import GROKDEPLOYMENTS, kube

__all__ = ["kube"]

GD = f"{GROKDEPLOYMENTS}/namespaces/llm/grokdeployments"
BODY = {
    "apiVersion": "grokserve.io/v1alpha1",
    "kind": "GrokDeployment",
    "metadata": {"name": "g", "labels": {"team": "a"}},
    "spec": {"model": {"preset": "grok-1"}, "replicas": 1},
    "status": {"ignored": True},
}


def call(
    url: str, method: str, path: str, body, content_type: str = "application/json"
) -> tuple[int, dict]:
    request = urllib.request.Request(url + path, data=json.dumps(body).encode(), method=method)
    request.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_api_server_semantics(kube) -> None:
    server, api = kube
    api.install_crds(kuberay=False)
    code, created = call(server.url, "POST", GD, BODY)
    assert code == 201
    meta = created["metadata"]
    assert meta["uid"] and meta["generation"] == 1 and meta["resourceVersion"]
    assert "status" not in created  # the status subresource is separate
    assert call(server.url, "POST", GD, BODY)[0] == 409

    stale = [{"op": "test", "path": "/metadata/resourceVersion", "value": "0"}]
    code, error = call(server.url, "PATCH", f"{GD}/g", stale, "application/json-patch+json")
    assert (code, error["reason"]) == (422, "Invalid")

    _, updated = call(
        server.url,
        "PATCH",
        f"{GD}/g",
        {"spec": {"replicas": 2}, "status": {"x": 1}},
        "application/merge-patch+json",
    )
    assert updated["metadata"]["generation"] == 2 and "status" not in updated
    _, with_status = call(
        server.url,
        "PATCH",
        f"{GD}/g/status",
        {"status": {"replicas": 2}, "spec": {"replicas": 9}},
        "application/merge-patch+json",
    )
    assert with_status["status"] == {"replicas": 2} and with_status["spec"]["replicas"] == 2
    assert with_status["metadata"]["generation"] == 2  # status writes do not bump the generation

    _, scale = call(
        server.url,
        "PATCH",
        f"{GD}/g/scale",
        {"spec": {"replicas": 3}},
        "application/merge-patch+json",
    )
    assert scale["kind"] == "Scale" and scale["spec"]["replicas"] == 3
    assert api.get(f"{GD}/g")["spec"]["replicas"] == 3

    assert [o["metadata"]["name"] for o in api.get(f"{GD}?labelSelector=team%3Da")["items"]] == [
        "g"
    ]
    assert api.get(f"{GD}?labelSelector=team%3Db")["items"] == []
    assert {n["metadata"]["name"] for n in api.get("/api/v1/namespaces")["items"]} >= {
        "default",
        "llm",
    }


@pytest.mark.parametrize(
    "path", ["/apis/nothing.io/v1/namespaces/x/things", "/api/v1/namespaces/x/pods"]
)
def test_unknown_resources_are_404(kube, path: str) -> None:
    server, _ = kube
    assert call(server.url, "POST", path, {"metadata": {"name": "a"}})[0] == 404


def test_server_side_apply(kube) -> None:
    """Apply creates, removes what the same manager stops applying, keeps other managers' fields,
    and conflicts (409) on a field another manager set, unless forced."""
    server, _api = kube
    cms = "/api/v1/namespaces/llm/configmaps"
    apply = "application/apply-patch+yaml"
    config = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}}
    first = {**config, "data": {"a": "1", "b": "2"}}
    assert call(server.url, "PATCH", f"{cms}/c", first, apply)[0] == 400  # no fieldManager
    code, created = call(server.url, "PATCH", f"{cms}/c?fieldManager=me", first, apply)
    assert code == 201 and created["data"] == {"a": "1", "b": "2"}
    call(
        server.url,
        "PATCH",
        f"{cms}/c?fieldManager=other",
        {"data": {"o": "x"}},
        "application/merge-patch+json",
    )
    code, second = call(
        server.url, "PATCH", f"{cms}/c?fieldManager=me", {**config, "data": {"a": "1"}}, apply
    )
    assert code == 200 and second["data"] == {"a": "1", "o": "x"}
    taken = {**config, "data": {"a": "1", "o": "mine"}}
    code, conflict = call(server.url, "PATCH", f"{cms}/c?fieldManager=me", taken, apply)
    assert code == 409 and '"other"' in conflict["message"]
    code, forced = call(server.url, "PATCH", f"{cms}/c?fieldManager=me&force=true", taken, apply)
    assert code == 200 and forced["data"] == {"a": "1", "o": "mine"}
    managers = {(e["manager"], e["operation"]) for e in forced["metadata"]["managedFields"]}
    assert managers == {("me", "Apply")}
    _, plain = call(server.url, "POST", cms, {**first, "metadata": {"name": "d"}})
    assert plain["metadata"]["managedFields"][0]["manager"] == "Python-urllib"


def test_custom_resources_get_their_crds_defaults(kube) -> None:
    server, api = kube
    api.install_crds(kuberay=False)
    code, created = call(server.url, "POST", GD, {**BODY, "spec": {"model": {"preset": "grok-1"}}})
    assert code == 201
    assert created["spec"]["replicas"] == 1 and created["spec"]["parallelism"]["gpusPerNode"] == 8
    _, patched = call(
        server.url,
        "PATCH",
        f"{GD}/g",
        {"spec": {"parallelism": None}},
        "application/merge-patch+json",
    )
    assert patched["spec"]["parallelism"]["gpusPerNode"] == 8  # removed, then defaulted again
