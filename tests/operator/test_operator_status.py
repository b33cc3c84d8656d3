"""Status from the RayService's status: Ready only when the current generation serves."""

from __future__ import annotations

from grokserve.operator.builders import Owner, build_rayservice
from grokserve.operator.replica import replica_plan
from grokserve.operator.spec import parse_spec
from grokserve.operator.status import (
    SPEC_FIELDS,
    build_status,
    failure_conditions,
    observed_replicas,
    serving_conditions,
)

OWNER = Owner(name="grok-1", namespace="llm")
SPEC = parse_spec(
    {
        "model": {"preset": "grok-1", "source": "pvc://weights/grok-1"},
        "replicas": 2,
        "parallelism": {"nodesPerReplica": 2},
    }
)
PLAN = replica_plan(OWNER.name, SPEC)


def rayservice(
    app_status: str = "RUNNING",
    deployments: dict | None = None,
    ready_workers: int = 4,
    generation: int = 3,
    observed: int = 3,
    pending: dict | None = None,
    ready: dict | None = None,
) -> dict:
    deployments = deployments if deployments is not None else {"GrokReplica": {"status": "HEALTHY"}}
    return {
        "metadata": {"generation": generation},
        "spec": build_rayservice(OWNER, SPEC)["spec"],
        "status": {
            "conditions": [ready] if ready else [],
            "observedGeneration": observed,
            "activeServiceStatus": {
                "applicationStatuses": {
                    "grok-1": {"status": app_status, "serveDeploymentStatuses": deployments}
                },
                "rayClusterStatus": {"readyWorkerReplicas": ready_workers},
            },
            "pendingServiceStatus": pending or {},
        },
    }


def by_type(conditions) -> dict:
    return {c.type: c for c in conditions}


def test_running_application_with_all_nodes_is_ready() -> None:
    conditions, ready = serving_conditions(OWNER, SPEC, rayservice())
    c = by_type(conditions)
    assert ready == 2
    assert (c["Ready"].status, c["Ready"].reason) == (True, "Serving")
    assert c["Progressing"].status is False and c["Degraded"].status is False


def test_stale_generation_is_not_ready_but_counts_what_serves() -> None:
    conditions, ready = serving_conditions(OWNER, SPEC, rayservice(observed=2))
    assert by_type(conditions)["Ready"].reason == "RayServiceUpdating"
    assert by_type(conditions)["Ready"].status is False
    assert ready == 2  # the previous spec's replicas still serve


def test_half_the_nodes_give_one_ready_replica_of_two_and_say_what_they_wait_for() -> None:
    conditions, ready = serving_conditions(OWNER, SPEC, rayservice(ready_workers=3))
    c = by_type(conditions)
    assert ready == 1
    assert c["Progressing"].status is True and c["Ready"].reason == "WaitingForNodes"
    assert c["Ready"].status is False  # Ready means every desired replica serves
    assert c["Ready"].message == "waiting for 1 GPU node(s): 3 of 4 worker nodes ready"


def test_replicas_deploying_without_their_nodes_wait_for_gpu_nodes() -> None:
    # A scale-up from 1 to 2: Serve's new replica is pending until Ray's autoscaler got its nodes.
    conditions, ready = serving_conditions(OWNER, SPEC, rayservice("DEPLOYING", ready_workers=2))
    assert ready == 0
    c = by_type(conditions)
    assert (c["Ready"].reason, c["Ready"].message) == (
        "WaitingForNodes",
        "waiting for 2 GPU node(s): 2 of 4 worker nodes ready",
    )
    cpu = parse_spec({"model": {"preset": "grok-tiny"}, "parallelism": {"device": "cpu"}})
    conditions, _ = serving_conditions(OWNER, cpu, rayservice("DEPLOYING", ready_workers=0))
    assert "waiting for 1 CPU worker node(s)" in by_type(conditions)["Ready"].message


VALIDATION_FAILED = {
    "type": "Ready",
    "status": "False",
    "reason": "ValidationFailed",
    "message": "llm/grok-1: spec.rayClusterConfig.workerGroupSpecs[0].replicas exceeds maxReplicas",
}


def test_kuberays_validation_failure_is_our_ready_false_with_its_reason_and_message() -> None:
    # KubeRay refuses the new generation (observedGeneration stays behind); the old one serves.
    refused = rayservice(observed=2, ready=VALIDATION_FAILED)
    conditions, ready = serving_conditions(OWNER, SPEC, refused)
    c = by_type(conditions)
    assert (c["Ready"].status, c["Ready"].reason) == (False, "ValidationFailed")
    assert c["Ready"].message == f"KubeRay: {VALIDATION_FAILED['message']}"
    assert c["Degraded"].status is True and c["Progressing"].status is False
    assert ready == 2
    # Once KubeRay accepts the generation, its leftover ValidationFailed no longer counts.
    accepted = serving_conditions(OWNER, SPEC, rayservice(ready=VALIDATION_FAILED))[0]
    assert by_type(accepted)["Ready"].reason == "Serving"


def test_kuberays_initializing_timeout_is_terminal() -> None:
    timeout = {**VALIDATION_FAILED, "reason": "InitializingTimeout", "message": "gave up after 5m"}
    conditions, _ = serving_conditions(OWNER, SPEC, rayservice(ready=timeout))
    c = by_type(conditions)
    assert (c["Ready"].reason, c["Ready"].message) == (
        "InitializingTimeout",
        "KubeRay: gave up after 5m",
    )


def test_kuberay_older_than_1_3_is_named() -> None:
    # An older CRD prunes spec.upgradeStrategy from what the API server stores.
    old = rayservice()
    old["spec"] = {k: v for k, v in old["spec"].items() if k != "upgradeStrategy"}
    conditions, ready = serving_conditions(OWNER, SPEC, old)
    c = by_type(conditions)
    assert (c["Ready"].reason, c["Degraded"].status) == ("KubeRayTooOld", True)
    assert "older than 1.3" in c["Ready"].message and ready == 0


def test_failed_deployment_is_degraded_with_serves_message() -> None:
    deployments = {"GrokReplica": {"status": "UNHEALTHY", "message": "CUDA out of memory"}}
    conditions, _ = serving_conditions(OWNER, SPEC, rayservice("DEPLOY_FAILED", deployments))
    c = by_type(conditions)
    assert c["Ready"].status is False and c["Degraded"].status is True
    assert "CUDA out of memory" in c["Ready"].message


def test_deploying_application_and_missing_rayservice() -> None:
    conditions, _ = serving_conditions(OWNER, SPEC, rayservice("DEPLOYING"))
    assert by_type(conditions)["Ready"].reason == "ServeApplicationDeploying"
    conditions, _ = serving_conditions(OWNER, SPEC, None)
    assert by_type(conditions)["Ready"].reason == "RayServiceMissing"
    empty = {
        "metadata": {"generation": 1},
        "spec": build_rayservice(OWNER, SPEC)["spec"],
        "status": {"observedGeneration": 1},
    }
    conditions, _ = serving_conditions(OWNER, SPEC, empty)
    assert by_type(conditions)["Ready"].reason == "ServeApplicationPending"


def test_pending_cluster_shows_progressing_while_old_one_serves() -> None:
    conditions, _ = serving_conditions(OWNER, SPEC, rayservice(pending={"rayClusterName": "rc-2"}))
    c = by_type(conditions)
    assert c["Ready"].status is True and c["Progressing"].reason == "ClusterUpgrading"


def test_kuberay_silent_is_pending_not_updating() -> None:
    """No status on the RayService at all: KubeRay has not reported (is it running?), rather than
    a previous spec serving meanwhile."""
    silent = {"metadata": {"generation": 1}, "spec": {"upgradeStrategy": {"type": "NewCluster"}}}
    conditions, ready = serving_conditions(OWNER, SPEC, silent)
    c = by_type(conditions)
    assert ready == 0 and c["Ready"].reason == "RayServicePending"
    assert "KubeRay's operator is running" in c["Ready"].message


def test_status_replicas_is_observed_not_desired() -> None:
    """status.replicas (what /scale reports as the current size) counts the replicas whose worker
    nodes exist; desiredReplicas is the spec's."""
    starting = rayservice(ready_workers=1)
    starting["status"]["activeServiceStatus"]["rayClusterStatus"]["availableWorkerReplicas"] = 2
    conditions, ready = serving_conditions(OWNER, SPEC, starting)
    status = build_status(
        OWNER,
        SPEC,
        PLAN,
        conditions,
        ready,
        observed_replicas=observed_replicas(SPEC, starting),
        generation=3,
        previous=None,
    )
    assert (status["replicas"], status["readyReplicas"], status["desiredReplicas"]) == (1, 0, 2)


def test_status_body_and_stable_transition_times() -> None:
    conditions, ready = serving_conditions(OWNER, SPEC, rayservice())
    first = build_status(
        OWNER,
        SPEC,
        PLAN,
        conditions,
        ready,
        observed_replicas=2,
        generation=3,
        previous=None,
        now="T1",
    )
    assert (
        first["replicas"] == 2 and first["readyReplicas"] == 2 and first["replicaSummary"] == "2/2"
    )
    assert first["gpus"] == 32 and first["selector"] == "grokserve.io/deployment=grok-1"
    assert first["endpoint"] == "http://grok-1.llm.svc:8000/v1"
    # the plan of one replica, rank by rank, not only the parallelism degrees
    placement = first["placement"].splitlines()
    assert placement[0].startswith(
        "2 replica(s) × 2 node(s) × 8 GPUs, pack; each replica: grok-1 on 2 nodes of 8×80 GiB"
    )
    assert placement[1].startswith("rank 0 (node 0): q heads 0-5, kv heads 0, experts 0-3 F[0:")
    assert len(placement) == 17 and placement[-1].startswith("rank 15 (node 1)")
    again = build_status(
        OWNER, SPEC, PLAN, conditions, ready, generation=4, previous=first, now="T2"
    )
    assert {c["lastTransitionTime"] for c in again["conditions"]} == {"T1"}
    failed = failure_conditions("KubeRayMissing", "install KubeRay")
    later = build_status(OWNER, None, None, failed, 0, generation=5, previous=again, now="T3")
    ready_condition = next(c for c in later["conditions"] if c["type"] == "Ready")
    assert ready_condition == {
        "type": "Ready",
        "status": "False",
        "reason": "KubeRayMissing",
        "message": "install KubeRay",
        "observedGeneration": 5,
        "lastTransitionTime": "T3",
    }
    # null: the merge patch deletes what an earlier success wrote
    assert {key: later[key] for key in SPEC_FIELDS} == dict.fromkeys(SPEC_FIELDS)
    assert later["readyReplicas"] == 0


def test_conditions_of_other_writers_are_kept() -> None:
    scaling = {"type": "ScalingActive", "status": "True", "reason": "QueueBelowTarget"}
    conditions, ready = serving_conditions(OWNER, SPEC, rayservice())
    status = build_status(
        OWNER,
        SPEC,
        PLAN,
        conditions,
        ready,
        generation=3,
        previous={"conditions": [scaling]},
        now="T",
    )
    assert [c["type"] for c in status["conditions"]] == [
        "Ready",
        "Progressing",
        "Degraded",
        "ScalingActive",
    ]
    assert status["conditions"][-1] == scaling


def test_scaled_to_zero_is_not_ready_and_not_degraded() -> None:
    conditions, ready = serving_conditions(
        OWNER, SPEC.model_copy(update={"replicas": 0}), rayservice()
    )
    c = by_type(conditions)
    assert ready == 0
    assert (c["Ready"].status, c["Ready"].reason) == (False, "ScaledToZero")
    assert c["Degraded"].status is False and c["Progressing"].status is False
    # The 4 nodes are still up: Ray's autoscaler removes them after the idle timeout.
    assert (
        c["Ready"].message
        == "scaled to zero: no model replica runs; the endpoint still answers (503 "
        "scaled_to_zero with Retry-After) and counts those requests as waiting, which wakes the "
        "deployment where the autoscaler is enabled; 4 worker node(s) go once idle for 60s"
    )
