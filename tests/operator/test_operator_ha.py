"""Two `grokserve operator` processes on one API server (the chart's `replicaCount: 2`): kopf
peering keeps one active; the other takes over when it goes."""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from testkit.operator_env import (
    GROKDEPLOYMENTS,
    PEERING_GRANTS,
    REPO,
    clusterrole_grants,
    kube,
    operator_requests,
    operator_subprocess,
    wait_until,
)

__all__ = ["kube"]

pytestmark = pytest.mark.timeout(120)

NS = "llm"
GD = f"{GROKDEPLOYMENTS}/namespaces/{NS}/grokdeployments"
RS = f"/apis/ray.io/v1/namespaces/{NS}/rayservices"
CRDS = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"
PEERING = "grokserve"
GD_PATH = f"{GD}/grok-1"
# The operator logs each status it writes (INFO).
STATUS_WRITTEN = f"GrokDeployment {NS}/grok-1: status written"


@contextmanager
def operator_process(log: Path, priority: int) -> Iterator[subprocess.Popen]:
    with log.open("w") as out:
        process = operator_subprocess(out, f"--peering={PEERING}", f"--priority={priority}")
        try:
            yield process
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=10)


def active(log: Path) -> bool:
    """Whether kopf's last word on peering in this log is that it operates (kopf starts paused
    and resumes once no higher-priority peer is alive)."""
    text = log.read_text()
    return text.rfind("Resuming operations") > text.rfind("Pausing operations")


def handled(log: Path) -> int:
    """How many times this process applied the RayService (the operator logs each at INFO)."""
    return log.read_text().count(f"RayService {NS}/grok-1 applied")


def test_two_operators_one_active_and_a_takeover(kube, tmp_path: Path) -> None:
    server, api = kube
    api.install_crds(kuberay=True)
    for crd in yaml.safe_load_all((REPO / "charts/grokserve/crds/kopf-peering.yaml").read_text()):
        api.create(CRDS, crd)
    peering = {
        "apiVersion": "kopf.dev/v1",
        "kind": "ClusterKopfPeering",
        "metadata": {"name": PEERING},
    }
    api.create("/apis/kopf.dev/v1/clusterkopfpeerings", peering)
    active_log, standby_log = tmp_path / "active.log", tmp_path / "standby.log"
    body = yaml.safe_load((REPO / "manifests/examples/grok-1-int8-single-node.yaml").read_text())
    with (
        operator_process(active_log, 200) as first,
        operator_process(standby_log, 100) as standby,
    ):
        wait_until(
            lambda: active(active_log) and not active(standby_log),
            what="one active operator and one paused",
        )
        api.create(GD, body)
        wait_until(lambda: api.get(f"{RS}/grok-1"), what="the RayService")
        wait_until(lambda: handled(active_log) == 1, what="the active operator's handler")
        assert handled(standby_log) == 0
        # KubeRay reports: the active operator writes the status, the standby (also watching) not.
        wait_until(
            lambda: api.get(GD_PATH).get("status", {}).get("observedGeneration") == 1,
            what="the reconcile's status",
        )
        api.merge_patch(f"{RS}/grok-1/status", {"status": {"observedGeneration": 1}})
        wait_until(
            lambda: (
                STATUS_WRITTEN in active_log.read_text()
                and any(
                    c["reason"] == "ServeApplicationPending"
                    for c in api.get(GD_PATH)["status"]["conditions"]
                )
            ),
            what="the active operator to mirror KubeRay's status",
        )
        assert STATUS_WRITTEN not in standby_log.read_text()

        # The active one goes (a rollout, a node drain): the standby takes over.
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=30) == 0
        api.merge_patch(f"{GD}/grok-1", {"spec": {"replicas": 2}})
        wait_until(
            lambda: (
                api.get(f"{RS}/grok-1")["spec"]["rayClusterConfig"]["workerGroupSpecs"][0][
                    "replicas"
                ]
                == 2
            ),
            what="the standby to reconcile the change",
        )
        assert handled(standby_log) >= 1
        standby.send_signal(signal.SIGTERM)
        assert standby.wait(timeout=30) == 0
    for log in (active_log, standby_log):
        assert "Traceback" not in log.read_text()
    # What both did is granted by the chart's roles (the operator's and peering's).
    assert server.call(operator_requests) - clusterrole_grants() - PEERING_GRANTS == set()
