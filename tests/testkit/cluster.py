"""Access to a real Kubernetes cluster for tests marked `cluster` (skipped without one).

A cluster is used when $KUBECONFIG names a kubeconfig whose API server answers `kubectl version`
within 10 s; see docs/operator.md for kind + KubeRay.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest


def require_cluster() -> None:
    if not os.environ.get("KUBECONFIG") or shutil.which("kubectl") is None:
        pytest.skip("no real cluster: set KUBECONFIG (and install kubectl) to run cluster tests")
    probe = subprocess.run(
        ["kubectl", "version", "--request-timeout=10s", "-o", "json"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if probe.returncode != 0:
        pytest.skip(f"the cluster in $KUBECONFIG does not answer: {probe.stderr.strip()[:200]}")


def kubectl(*args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
    result = subprocess.run(["kubectl", *args], capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"kubectl {' '.join(args)} failed: {result.stderr}")
    return result
