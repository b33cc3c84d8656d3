"""The operator (kopf) against the KMock API server: children, status, updates, restarts, deletes."""

from __future__ import annotations

import copy
import time
from pathlib import Path

import pytest
import yaml
from prometheus_client import REGISTRY

from grokserve.operator import handlers
from grokserve.operator.controller import run_pass
from grokserve.operator.kube import Kube
from testkit.operator_env import (
    GROKDEPLOYMENTS,
    KUBERAY_CRD,
    SERVICEMONITOR_CRD,
    kube,
    rayservice_status,
    refusing,
    running_operator,
    wait_until,
)

__all__ = ["kube"]  # the fixture, re-exported for pytest

pytestmark = pytest.mark.timeout(120)

EXAMPLES = Path(__file__).resolve().parents[2] / "manifests" / "examples"
NS = "llm"
GD = f"{GROKDEPLOYMENTS}/namespaces/{NS}/grokdeployments"
RS = f"/apis/ray.io/v1/namespaces/{NS}/rayservices"


def example_body() -> dict:
    return yaml.safe_load((EXAMPLES / "grok-1-int8-single-node.yaml").read_text())


def condition(body: dict | None, kind: str = "Ready") -> dict:
    for item in ((body or {}).get("status") or {}).get("conditions", []):
        if item["type"] == kind:
            return item
    return {}


def test_lifecycle_create_ready_update_restart_delete(kube) -> None:
    _server, api = kube
    api.install_crds(kuberay=True)
    with running_operator():
        api.create(GD, example_body())
        # create -> children + status
        rayservice = wait_until(lambda: api.get(f"{RS}/grok-1"), what="the RayService")
        assert rayservice["metadata"]["ownerReferences"][0]["kind"] == "GrokDeployment"
        for path in (
            f"/api/v1/namespaces/{NS}/services/grok-1",
            f"/api/v1/namespaces/{NS}/configmaps/grok-1-serving",
            f"/apis/policy/v1/namespaces/{NS}/poddisruptionbudgets/grok-1",
        ):
            assert wait_until(lambda p=path: api.get(p), what=path)
        body = wait_until(
            lambda: (b := api.get(f"{GD}/grok-1")) and condition(b) and b, what="status"
        )
        assert condition(body)["status"] == "False"
        assert body["status"]["selector"] == "grokserve.io/deployment=grok-1"

        # child status -> Ready
        api.merge_patch(
            f"{RS}/grok-1/status",
            {"status": rayservice_status(rayservice["metadata"]["generation"], 1)},
        )
        body = wait_until(
            lambda: (b := api.get(f"{GD}/grok-1")) and condition(b).get("status") == "True" and b,
            what="Ready=True",
        )
        assert body["status"]["readyReplicas"] == 1
        labels = {"namespace": NS, "name": "grok-1"}
        assert REGISTRY.get_sample_value("grokdeployment_condition_ready", labels) == 1
        assert REGISTRY.get_sample_value("grokdeployment_ready_replicas", labels) == 1
        assert REGISTRY.get_sample_value("grokdeployment_desired_replicas", labels) == 1
        assert body["status"]["endpoint"] == "http://grok-1.llm.svc:8000/v1"

        # spec update -> children patched, generation observed
        api.merge_patch(f"{GD}/grok-1", {"spec": {"replicas": 3}})
        wait_until(
            lambda: (
                api.get(f"{RS}/grok-1")["spec"]["rayClusterConfig"]["workerGroupSpecs"][0][
                    "replicas"
                ]
                == 3
            ),
            what="the worker group to grow to 3 nodes",
        )
        body = wait_until(
            lambda: (
                (b := api.get(f"{GD}/grok-1"))["status"].get("observedGeneration")
                == b["metadata"]["generation"]
                and b
            ),
            what="the new generation to be observed",
        )
        assert body["metadata"]["generation"] == 2
        assert condition(body)["reason"] == "RayServiceUpdating"

    # operator restart -> the same children, no duplicates
    uid_before = api.get(f"{RS}/grok-1")["metadata"]["uid"]
    with running_operator():
        api.merge_patch(f"{GD}/grok-1", {"spec": {"serving": {"maxBatchSize": 32}}})
        wait_until(
            lambda: "maxBatchSize: 32" in api.get(f"{RS}/grok-1")["spec"]["serveConfigV2"],
            what="the serve config to change in place",
        )
    assert api.get(f"{RS}/grok-1")["metadata"]["uid"] == uid_before
    assert len(api.get(RS)["items"]) == 1
    assert len(api.get(f"/api/v1/namespaces/{NS}/services")["items"]) == 1

    # delete -> the owner goes (kopf releases its timer's finalizer) and its children with it
    with running_operator():
        api.delete(f"{GD}/grok-1")
        wait_until(lambda: api.get(f"{GD}/grok-1") is None, what="the GrokDeployment to go")
    assert api.get(RS)["items"] == []
    assert api.get(f"/api/v1/namespaces/{NS}/configmaps")["items"] == []


def test_invalid_spec_becomes_a_condition_and_an_event(kube) -> None:
    _server, api = kube
    api.install_crds(kuberay=True)
    body = example_body()
    body["spec"]["serving"]["maxSequenceLength"] = 100000  # the CRD cannot know the model's context
    with running_operator() as runner:
        api.create(GD, body)
        got = wait_until(lambda: condition(api.get(f"{GD}/grok-1")), what="a Ready condition")
        assert got["status"] == "False" and got["reason"] == "InvalidSpec"
        assert (
            "serving.maxSequenceLength must not exceed the model's context (grok-1: 8192"
            in got["message"]
        )
        events = wait_until(
            lambda: api.get(f"/api/v1/namespaces/{NS}/events")["items"], what="an Event"
        )
        assert any(e["reason"] == "InvalidSpec" for e in events)
        assert api.get(RS)["items"] == []
        # fixing the spec recovers without restarting anything
        fixed = copy.deepcopy(body["spec"]["serving"])
        fixed["maxSequenceLength"] = 4096
        api.merge_patch(f"{GD}/grok-1", {"spec": {"serving": fixed}})
        wait_until(lambda: api.get(f"{RS}/grok-1"), what="the RayService after the fix")
    assert "Traceback" not in runner.output


def children_of(api) -> list[str]:
    paths = (
        RS,
        f"/api/v1/namespaces/{NS}/configmaps",
        f"/api/v1/namespaces/{NS}/services",
        f"/apis/policy/v1/namespaces/{NS}/poddisruptionbudgets",
    )
    return [item["metadata"]["name"] for path in paths for item in api.get(path)["items"]]


def test_a_replica_that_does_not_fit_is_refused_until_the_spec_fits(kube) -> None:
    _server, api = kube
    api.install_crds(kuberay=True)
    body = example_body()
    body["spec"]["parallelism"]["gpuMemory"] = "40Gi"
    with running_operator() as runner:
        api.create(GD, body)
        got = wait_until(lambda: condition(api.get(f"{GD}/grok-1")), what="a Ready condition")
        assert got["status"] == "False" and got["reason"] == "DoesNotFit"
        # the planner's message: which rank needs how much of what, and what would fit
        assert "grok-1 in int8 does not fit on 1 node of 8×40 GiB" in got["message"]
        assert "rank 0 needs" in got["message"] and "KV cache" in got["message"]
        assert "needs ≥ 2 nodes of 8×40 GiB in int8" in got["message"]
        events = wait_until(
            lambda: [
                e
                for e in api.get(f"/api/v1/namespaces/{NS}/events")["items"]
                if e["reason"] == "DoesNotFit"
            ],
            what="a DoesNotFit Event",
        )
        assert events[0]["type"] == "Warning"
        assert children_of(api) == []
        # fits on GPUs of 80Gi: the condition clears and the children appear
        api.merge_patch(f"{GD}/grok-1", {"spec": {"parallelism": {"gpuMemory": "80Gi"}}})
        rayservice = wait_until(lambda: api.get(f"{RS}/grok-1"), what="the RayService")
        body = wait_until(
            lambda: (
                (b := api.get(f"{GD}/grok-1")) and condition(b).get("reason") != "DoesNotFit" and b
            ),
            what="DoesNotFit to clear",
        )
        assert body["status"]["placement"].splitlines()[1].startswith("rank 0 (node 0): q heads")
        # squeezing it again leaves the running children as they are
        api.merge_patch(f"{GD}/grok-1", {"spec": {"parallelism": {"gpuMemory": "40Gi"}}})
        wait_until(
            lambda: condition(api.get(f"{GD}/grok-1")).get("reason") == "DoesNotFit",
            what="DoesNotFit again",
        )
        after = api.get(f"{RS}/grok-1")
        assert after["metadata"]["resourceVersion"] == rayservice["metadata"]["resourceVersion"]
    assert "Traceback" not in runner.output


def test_missing_kuberay_is_reported_with_how_to_install_it(kube) -> None:
    _server, api = kube
    api.install_crds(kuberay=False)
    with running_operator():
        api.create(GD, example_body())
        got = wait_until(lambda: condition(api.get(f"{GD}/grok-1")), what="a Ready condition")
    assert got["reason"] == "KubeRayMissing"
    assert "helm install kuberay-operator" in got["message"]


def test_a_child_refused_by_the_api_server_is_reported_not_retried(kube) -> None:
    server, api = kube
    api.install_crds(kuberay=True)

    quota = "workerGroupSpecs[0].replicas: 8 GPUs exceed the namespace quota"
    kuberay_webhook = refusing("PATCH", "rayservices", 422, quota)
    server.call(lambda kube_api: kube_api.admission.append(kuberay_webhook))
    with running_operator():
        api.create(GD, example_body())
        got = wait_until(lambda: condition(api.get(f"{GD}/grok-1")), what="a Ready condition")
        assert (got["status"], got["reason"]) == ("False", "ChildRejected")
        assert (
            got["message"]
            == "RayService grok-1: workerGroupSpecs[0].replicas: 8 GPUs exceed the namespace quota"
        )


def passes() -> float:
    """Reconcile passes the operator (in this process) has finished, status write included."""
    labels = {"outcome": "ok"}
    return REGISTRY.get_sample_value("grokdeployment_reconcile_duration_seconds_count", labels) or 0


def test_a_rayservice_event_leaves_a_reconcile_failure_standing(kube) -> None:
    server, api = kube
    api.install_crds(kuberay=True)

    forbidden = "poddisruptionbudgets are forbidden in this namespace"
    pdb_quota = refusing("PATCH", "poddisruptionbudgets", 403, forbidden)
    server.call(lambda kube_api: kube_api.admission.append(pdb_quota))
    with running_operator():
        api.create(GD, example_body())
        failed = wait_until(
            lambda: (
                (b := api.get(f"{GD}/grok-1")) and condition(b).get("reason") == "Forbidden" and b
            ),
            what="Ready Forbidden",
        )
        # The RayService was applied before the PDB was refused; KubeRay reports it serving.
        rayservice = api.get(f"{RS}/grok-1")
        seen = passes()
        api.merge_patch(
            f"{RS}/grok-1/status",
            {"status": rayservice_status(rayservice["metadata"]["generation"], 1)},
        )
        wait_until(lambda: passes() > seen, what="the pass the RayService event started")
        body = api.get(f"{GD}/grok-1")
    assert condition(body) == condition(failed)
    assert condition(body, "Degraded")["status"] == "True"
    assert body["status"]["readyReplicas"] == 0


def test_changing_the_upgrade_strategy_back_to_the_default_reaches_the_rayservice(kube) -> None:
    _server, api = kube
    api.install_crds(kuberay=True)
    body = example_body()
    body["spec"].setdefault("ray", {})["upgradeStrategy"] = "None"

    def strategy() -> dict | None:
        rayservice = api.get(f"{RS}/grok-1")
        return rayservice and rayservice["spec"].get("upgradeStrategy")

    with running_operator():
        api.create(GD, body)
        wait_until(lambda: strategy() == {"type": "None"}, what="upgradeStrategy None")
        api.merge_patch(f"{GD}/grok-1", {"spec": {"ray": {"upgradeStrategy": None}}})
        wait_until(lambda: strategy() == {"type": "NewCluster"}, what="upgradeStrategy NewCluster")


def test_a_failure_leaves_nothing_that_claims_the_deployment_serves(kube) -> None:
    _server, api = kube
    api.install_crds(kuberay=True)
    with running_operator():
        api.create(GD, example_body())
        rayservice = wait_until(lambda: api.get(f"{RS}/grok-1"), what="the RayService")
        api.merge_patch(
            f"{RS}/grok-1/status",
            {"status": rayservice_status(rayservice["metadata"]["generation"], 1)},
        )
        serving = wait_until(
            lambda: (b := api.get(f"{GD}/grok-1")) and condition(b).get("status") == "True" and b,
            what="Ready=True",
        )
        assert serving["status"]["endpoint"] and serving["status"]["readyReplicas"] == 1
        api.merge_patch(f"{GD}/grok-1", {"spec": {"serving": {"maxSequenceLength": 100000}}})
        failed = wait_until(
            lambda: (
                (b := api.get(f"{GD}/grok-1")) and condition(b).get("reason") == "InvalidSpec" and b
            ),
            what="Ready InvalidSpec",
        )
    status = failed["status"]
    assert status["readyReplicas"] == 0
    for stale in ("endpoint", "replicaSummary", "replicas", "desiredReplicas", "gpus", "placement"):
        assert stale not in status


def scaling_condition(reason: str) -> dict:
    return {
        "type": "ScalingActive",
        "status": "True" if reason == "ValidMetric" else "False",
        "reason": reason,
        "message": "written by the autoscaler",
        "lastTransitionTime": "2026-01-01T00:00:00Z",
    }


def test_a_condition_written_during_a_reconcile_survives_its_status_write(kube) -> None:
    """The autoscaler sets ScalingActive while a reconcile pass applies the children: the pass's
    status write neither drops it nor brings back the one it read before."""
    _server, api = kube
    api.install_crds(kuberay=True)
    stale = api.create(GD, example_body())
    api.merge_patch(
        f"{GD}/grok-1/status", {"status": {"conditions": [scaling_condition("ScaleFailed")]}}
    )
    stale = api.get(f"{GD}/grok-1")

    class AutoscalerMeanwhile(Kube):
        def apply(self, body: dict) -> None:
            conditions = [scaling_condition("ValidMetric")]
            api.merge_patch(f"{GD}/grok-1/status", {"status": {"conditions": conditions}})
            return super().apply(body)

    run_pass(AutoscalerMeanwhile(handlers._api_client()), stale)
    stored = api.get(f"{GD}/grok-1")
    assert condition(stored, "ScalingActive") == scaling_condition("ValidMetric")
    assert condition(stored)["reason"] == "RayServicePending"


def test_a_field_removed_from_the_spec_goes_from_the_rayservice(kube) -> None:
    _server, api = kube
    api.install_crds(kuberay=True)
    body = example_body()
    body["spec"].setdefault("ray", {})["serviceAccountName"] = "s3-reader"

    def service_accounts() -> set | None:
        rayservice = api.get(f"{RS}/grok-1")
        if not rayservice:
            return None
        cluster = rayservice["spec"]["rayClusterConfig"]
        groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
        return {g["template"]["spec"].get("serviceAccountName") for g in groups}

    with running_operator():
        api.create(GD, body)
        wait_until(lambda: service_accounts() == {"s3-reader"}, what="the service account")
        api.merge_patch(f"{GD}/grok-1", {"spec": {"ray": {"serviceAccountName": None}}})
        wait_until(lambda: service_accounts() == {None}, what="no service account")


def test_a_squatted_child_name_is_a_conflict_and_nothing_is_touched(kube) -> None:
    """A Service someone else made under a child's name is neither modified nor adopted (the
    garbage collector would delete it with the GrokDeployment), and no other child is written."""
    _server, api = kube
    api.install_crds(kuberay=True)
    services = f"/api/v1/namespaces/{NS}/services"
    theirs = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "grok-1", "namespace": NS, "labels": {"team": "web"}},
        "spec": {"ports": [{"port": 80}]},
    }
    stored = api.create(services, theirs)
    with running_operator():
        api.create(GD, example_body())
        got = wait_until(lambda: condition(api.get(f"{GD}/grok-1")), what="a Ready condition")
        assert (got["status"], got["reason"]) == ("False", "ChildConflict")
        assert "Service grok-1" in got["message"]
        assert api.get(f"{services}/grok-1") == stored
        assert api.get(f"{RS}/grok-1") is None
        # Gone, the name is free: the next pass (the resync) creates the children.
        api.delete(f"{services}/grok-1")
        api.merge_patch(f"{GD}/grok-1", {"spec": {"replicas": 2}})
        created = wait_until(lambda: api.get(f"{services}/grok-1"), what="our Service")
        assert created["metadata"]["ownerReferences"][0]["kind"] == "GrokDeployment"


def test_every_write_names_the_operator_as_field_manager(kube) -> None:
    """Children by server-side apply, the status by patches: managedFields say grokserve-operator
    (the Python client's default would be OpenAPI-Generator)."""
    _server, api = kube
    api.install_crds(kuberay=True)
    with running_operator():
        api.create(GD, example_body())
        wait_until(lambda: condition(api.get(f"{GD}/grok-1")), what="a Ready condition")
        wait_until(lambda: api.get(f"/apis/policy/v1/namespaces/{NS}/poddisruptionbudgets/grok-1"))
    for path in (
        f"{RS}/grok-1",
        f"/api/v1/namespaces/{NS}/services/grok-1",
        f"/api/v1/namespaces/{NS}/configmaps/grok-1-serving",
        f"/apis/policy/v1/namespaces/{NS}/poddisruptionbudgets/grok-1",
    ):
        entries = api.get(path)["metadata"]["managedFields"]
        assert [(e["manager"], e["operation"]) for e in entries] == [
            ("grokserve-operator", "Apply")
        ], path
    status_writers = {
        e["manager"]
        for e in api.get(f"{GD}/grok-1")["metadata"]["managedFields"]
        if e.get("subresource") == "status"
    }
    assert status_writers == {"grokserve-operator"}


CRDS = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"


def ready_after_kuberay_reports(api, replicas: int) -> dict:
    """KubeRay reports the RayService serving; the owner's status follows through the watch.

    (After the reconcile has written its status: a RayService event during a reconcile pass is
    left to the pass, which may have read the RayService before, and then to the resync.)"""
    rayservice = wait_until(lambda: api.get(f"{RS}/grok-1"), what="the RayService")
    wait_until(
        lambda: (
            (b := api.get(f"{GD}/grok-1"))["status"].get("observedGeneration")
            == b["metadata"]["generation"]
            and condition(b).get("reason") == "RayServicePending"
        ),
        what="the reconcile's status",
    )
    api.merge_patch(
        f"{RS}/grok-1/status",
        {"status": rayservice_status(rayservice["metadata"]["generation"], replicas)},
    )
    return wait_until(
        lambda: condition(api.get(f"{GD}/grok-1")).get("status") == "True",
        timeout=5,  # well under the resync: the watch, not the periodic pass, brought it
        what="Ready=True from the RayService's status",
    )


def reconcile_now(api, replicas: int) -> None:
    """A spec change: the reconcile that the periodic resync (30 s) would otherwise run."""
    api.merge_patch(f"{GD}/grok-1", {"spec": {"replicas": replicas}})


def test_kuberay_installed_after_the_operator_is_picked_up(kube, monkeypatch) -> None:
    _server, api = kube
    api.install_crds(kuberay=False)
    monkeypatch.setattr("grokserve.operator.child_watch.ABSENT_POLL_S", 0.2)
    with running_operator():
        api.create(GD, example_body())
        wait_until(
            lambda: condition(api.get(f"{GD}/grok-1")).get("reason") == "KubeRayMissing",
            what="KubeRayMissing",
        )
        api.create(CRDS, KUBERAY_CRD)
        reconcile_now(api, 2)
        ready_after_kuberay_reports(api, 2)


def test_kuberay_crd_deleted_and_recreated_while_the_operator_runs(kube, monkeypatch) -> None:
    """Deleting KubeRay's CRD ends its watch, and watching it again gets 404s: the operator keeps
    running, reports KubeRayMissing, and re-creates the RayService once the CRD is back."""
    _server, api = kube
    api.install_crds(kuberay=True)
    monkeypatch.setattr("grokserve.operator.child_watch.ABSENT_POLL_S", 0.2)
    monkeypatch.setattr("grokserve.operator.child_watch.RETRY_MIN_S", 0.2)
    with running_operator() as runner:
        api.create(GD, example_body())
        ready_after_kuberay_reports(api, 1)
        api.delete(f"{CRDS}/rayservices.ray.io")
        reconcile_now(api, 2)
        wait_until(
            lambda: condition(api.get(f"{GD}/grok-1")).get("reason") == "KubeRayMissing",
            what="KubeRayMissing after the CRD's deletion",
        )
        api.create(CRDS, KUBERAY_CRD)
        reconcile_now(api, 1)
        ready_after_kuberay_reports(api, 1)
    assert runner.exception is None
    assert "Traceback" not in runner.output


def test_a_transient_api_error_is_a_condition_retried_with_backoff(kube) -> None:
    server, api = kube
    api.install_crds(kuberay=True)
    unavailable = refusing("PATCH", "rayservices", 503, "etcdserver: leader changed")
    server.call(lambda kube_api: kube_api.admission.append(unavailable))

    def rayservice_writes() -> int:
        return server.call(
            lambda kube_api: sum(
                1
                for r in kube_api
                if r.resource is not None
                and r.resource.plural == "rayservices"
                and r.method.value.upper() == "PATCH"
            )
        )

    with running_operator():
        api.create(GD, example_body())
        got = wait_until(
            lambda: (
                condition(api.get(f"{GD}/grok-1")).get("reason") == "APIServerError"
                and condition(api.get(f"{GD}/grok-1"))
            ),
            what="Ready APIServerError",
        )
        assert "etcdserver: leader changed" in got["message"] and "HTTP 503" in got["message"]
        assert "retrying in 5 s" in got["message"]
        writes = rayservice_writes()
        time.sleep(2)
        assert rayservice_writes() == writes  # no tight loop: the next try waits its backoff
        server.call(lambda kube_api: kube_api.admission.remove(unavailable))
        wait_until(lambda: api.get(f"{RS}/grok-1"), timeout=15, what="the RayService after it")
        wait_until(
            lambda: condition(api.get(f"{GD}/grok-1")).get("reason") != "APIServerError",
            what="the condition to clear",
        )


def test_the_prometheus_operator_installed_later_gets_its_servicemonitor_at_the_next_pass(
    kube,
) -> None:
    _server, api = kube
    api.install_crds(kuberay=True)
    created = api.create(GD, example_body())
    kube_client = Kube(handlers._api_client())
    run_pass(kube_client, created)
    monitors = f"/apis/monitoring.coreos.com/v1/namespaces/{NS}/servicemonitors"
    assert api.get(f"/api/v1/namespaces/{NS}/services/grok-1") is not None
    api.create(CRDS, SERVICEMONITOR_CRD)
    run_pass(kube_client, api.get(f"{GD}/grok-1"))
    assert api.get(f"{monitors}/grok-1")["spec"]["endpoints"][0]["port"] == "api"
    assert api.get(f"/api/v1/namespaces/{NS}/services/grok-1-metrics") is not None


@pytest.mark.parametrize(
    ("method", "status", "reason"),
    [("GET", 403, "Forbidden"), ("PATCH", 413, "ChildRejected")],
)
def test_refused_reads_and_oversized_children_are_reported(kube, method, status, reason) -> None:
    server, api = kube
    api.install_crds(kuberay=True)
    refused = refusing(method, "services", status, f"{method} services: no")
    server.call(lambda kube_api: kube_api.admission.append(refused))
    with running_operator():
        api.create(GD, example_body())
        got = wait_until(lambda: condition(api.get(f"{GD}/grok-1")), what="a Ready condition")
        assert (got["status"], got["reason"]) == ("False", reason)
        assert f"{method} services: no" in got["message"]
