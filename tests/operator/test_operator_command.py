"""`grokserve operator` as a process, limited to one namespace: reconciles against KMock, serves
metrics and /healthz, stops on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import yaml

from testkit.operator_env import GROKDEPLOYMENTS, REPO, kube, wait_until

__all__ = ["kube"]

pytestmark = pytest.mark.timeout(120)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def fetch(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.read().decode()
    except OSError:
        return None


def test_operator_command_reconciles_and_exports_metrics(kube, tmp_path: Path) -> None:
    _server, api = kube
    api.install_crds(kuberay=True)
    metrics_port, health_port = free_port(), free_port()
    log = (tmp_path / "operator.log").open("w")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "grokserve.cli",
            "operator",
            f"--metrics-port={metrics_port}",
            f"--health-port={health_port}",
            "--listen-host=127.0.0.1",
            "--namespace=llm",
            "--log-format=json",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONSAFEPATH": "1"},
    )
    try:
        body = yaml.safe_load((REPO / "manifests/examples/grok-1-bf16-two-node.yaml").read_text())
        api.create(f"{GROKDEPLOYMENTS}/namespaces/llm/grokdeployments", body)
        elsewhere = {**body, "metadata": {"name": "grok-1-bf16", "namespace": "elsewhere"}}
        api.create(f"{GROKDEPLOYMENTS}/namespaces/elsewhere/grokdeployments", elsewhere)
        wait_until(
            lambda: api.get("/apis/ray.io/v1/namespaces/llm/rayservices/grok-1-bf16"),
            what="the RayService",
        )
        sample = 'grokdeployment_desired_replicas{name="grok-1-bf16",namespace="llm"} 1.0'
        wait_until(
            lambda: sample in (fetch(f"http://127.0.0.1:{metrics_port}/metrics") or ""), what=sample
        )
        assert "grokdeployment_reconcile_duration_seconds_count" in fetch(
            f"http://127.0.0.1:{metrics_port}/metrics"
        )
        assert wait_until(
            lambda: fetch(f"http://127.0.0.1:{health_port}/healthz") is not None, what="/healthz"
        )
        # --namespace=llm: the deployment in another namespace is not the operator's business.
        assert api.get("/apis/ray.io/v1/namespaces/elsewhere/rayservices")["items"] == []
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
        log.close()
    lines = (tmp_path / "operator.log").read_text().splitlines()
    assert "Traceback" not in "\n".join(lines)
    # Logging is on by default (INFO, no --verbose), one JSON object per record.
    records = [json.loads(line) for line in lines if line.startswith("{")]
    assert any("RayService llm/grok-1-bf16 applied" in r["message"] for r in records), lines[-20:]
    assert not any(r.get("severity") == "debug" for r in records)


def test_colliding_ports_are_refused_naming_both() -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "grokserve.cli",
            "operator",
            "--metrics-port=9100",
            "--health-port=9100",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONSAFEPATH": "1"},
        timeout=60,
    )
    assert done.returncode != 0
    assert "--metrics-port and --health-port are both 9100" in done.stderr
