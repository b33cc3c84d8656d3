"""The operator on a real cluster (kind + KubeRay), driven like a user would: marked `cluster`.

Runs `grokserve operator` locally against $KUBECONFIG, applies the tiny CPU example, and checks
the children, the status, and that deleting the GrokDeployment removes them. Readiness needs the
serving image loaded into the cluster (docs/operator.md); set GROKSERVE_CLUSTER_READY_TIMEOUT
(seconds) to also wait for Ready=True.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path

import pytest

from testkit.cluster import kubectl, require_cluster
from testkit.operator_env import operator_subprocess, wait_until

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(1800)]

REPO = Path(__file__).resolve().parents[2]


def gd_status(namespace: str) -> dict:
    out = kubectl("get", "gd", "grok-tiny", "-n", namespace, "-o", "json", check=False)
    return json.loads(out.stdout).get("status", {}) if out.returncode == 0 else {}


def test_tiny_cpu_deployment_on_a_real_cluster(tmp_path: Path) -> None:
    require_cluster()
    namespace = f"grokserve-test-{uuid.uuid4().hex[:6]}"
    kubectl("apply", "-f", str(REPO / "manifests/crd/grokdeployments.yaml"))
    kubectl("create", "namespace", namespace)
    log = (tmp_path / "operator.log").open("w")
    operator = operator_subprocess(log, f"--namespace={namespace}")
    try:
        kubectl("apply", "-n", namespace, "-f", str(REPO / "manifests/examples/grok-tiny-cpu.yaml"))
        status = wait_until(
            lambda: gd_status(namespace).get("conditions"), timeout=120, what="status"
        )
        ready = next(c for c in status if c["type"] == "Ready")
        if ready["reason"] == "KubeRayMissing":
            pytest.skip("KubeRay is not installed in this cluster")
        owner = kubectl(
            "get",
            "rayservice",
            "grok-tiny",
            "-n",
            namespace,
            "-o",
            "jsonpath={.metadata.ownerReferences[0].kind}",
        )
        assert owner.stdout == "GrokDeployment"
        ready_timeout = float(os.environ.get("GROKSERVE_CLUSTER_READY_TIMEOUT", "0"))
        if ready_timeout:
            wait_until(
                lambda: any(
                    c["type"] == "Ready" and c["status"] == "True"
                    for c in gd_status(namespace).get("conditions", [])
                ),
                timeout=ready_timeout,
                what="Ready=True",
            )
        kubectl("delete", "gd", "grok-tiny", "-n", namespace, "--wait=true", timeout=300)
        deadline = time.monotonic() + 120
        while (
            kubectl("get", "rayservice", "grok-tiny", "-n", namespace, check=False).returncode == 0
        ):
            assert time.monotonic() < deadline, "the RayService outlived its GrokDeployment"
            time.sleep(2)
    finally:
        operator.terminate()
        operator.wait(timeout=30)
        log.close()
        kubectl("delete", "namespace", namespace, "--wait=false", check=False)
