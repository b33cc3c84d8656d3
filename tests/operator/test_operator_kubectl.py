"""kubectl (the real binary) against KMock with the operator running: apply, get, scale, delete."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from testkit.operator_env import (
    GROKDEPLOYMENTS,
    KUBERAY_CRD,
    REPO,
    kube,
    running_operator,
    wait_until,
)

__all__ = ["kube"]

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed"),
]

GD = f"{GROKDEPLOYMENTS}/namespaces/llm/grokdeployments/grok-1"


def kubectl(*args: str) -> str:
    result = subprocess.run(
        ["kubectl", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env=dict(os.environ),
        cwd=REPO,
    )
    assert result.returncode == 0, f"kubectl {' '.join(args)}: {result.stderr}"
    assert "Warning" not in result.stderr, result.stderr
    return result.stdout


def test_kubectl_apply_get_scale_delete(kube) -> None:
    _server, api = kube
    api.create("/apis/apiextensions.k8s.io/v1/customresourcedefinitions", KUBERAY_CRD)
    # The operator starts before its CRD exists and notices it when kubectl applies it.
    with running_operator():
        kubectl("apply", "-f", "manifests/crd/", "--validate=false")
        out = kubectl(
            "apply", "-f", "manifests/examples/grok-1-int8-single-node.yaml", "--validate=false"
        )
        assert "grokdeployment.grokserve.io/grok-1 created" in out
        wait_until(lambda: (api.get(GD).get("status") or {}).get("endpoint"), what="the status")
        table = kubectl("get", "gd", "-n", "llm")
        header, row = table.splitlines()
        assert header.split() == ["NAME", "READY", "REPLICAS", "GPUS", "ENDPOINT", "AGE"]
        assert row.split()[:5] == ["grok-1", "False", "0/1", "8", "http://grok-1.llm.svc:8000/v1"]
        assert "grokdeployment.grokserve.io/grok-1 scaled" in kubectl(
            "scale", "gd", "grok-1", "-n", "llm", "--replicas=3"
        )
        wait_until(
            lambda: (
                api.get("/apis/ray.io/v1/namespaces/llm/rayservices/grok-1")["spec"][
                    "rayClusterConfig"
                ]["workerGroupSpecs"][0]["replicas"]
                == 3
            ),
            what="the scaled worker group",
        )
        status = "jsonpath={.status.desiredReplicas}/{.status.replicas}"
        # Desired 3; observed (status.replicas, what /scale reports) 0: no KubeRay runs here.
        wait_until(
            lambda: kubectl("get", "gd", "grok-1", "-n", "llm", "-o", status) == "3/0",
            what="desired 3, observed 0",
        )
        kubectl("delete", "gd", "grok-1", "-n", "llm", "--wait=false")
        wait_until(
            lambda: (
                "No resources found"
                in subprocess.run(
                    ["kubectl", "get", "gd", "-n", "llm"],
                    capture_output=True,
                    text=True,
                    timeout=30,
                ).stderr
            ),
            what="kubectl to show no GrokDeployments",
        )
