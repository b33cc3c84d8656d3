"""While replicas load their weights, the GrokDeployment's status says how far they are: the pure
message and conditions, then the whole operator reading a real Prometheus that scrapes the
replica's own metrics, against the KMock API server."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import start_http_server

from grokserve.operator import controller
from grokserve.operator.autoscaling.policy import MetricFailure
from grokserve.operator.autoscaling.prometheus import read_loading_progress
from grokserve.operator.status import (
    Condition,
    LoadingProgress,
    binary_bytes,
    build_status,
    loading_conditions,
    serving_conditions,
)
from grokserve.serving.metrics import ReplicaMetrics
from testkit.operator_env import (
    GROKDEPLOYMENTS,
    kube,
    rayservice_status,
    running_operator,
    wait_until,
)
from testkit.prometheus import PrometheusServer, ScrapeTarget, free_port

__all__ = ["kube"]  # the fixture, re-exported for pytest

GIB, MIB = 1 << 30, 1 << 20
EXAMPLE = (
    Path(__file__).resolve().parents[2] / "manifests" / "examples" / "grok-1-int8-single-node.yaml"
)
NS, NAME = "llm", "grok-1"
GD = f"{GROKDEPLOYMENTS}/namespaces/{NS}/grokdeployments/{NAME}"
RS = f"/apis/ray.io/v1/namespaces/{NS}/rayservices/{NAME}"


# -- pure -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("count", "text"),
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1.00 KiB"),
        (850 * MIB, "850 MiB"),
        (12.34 * GIB, "12.3 GiB"),
        (300 * GIB, "300 GiB"),
        (1.254 * 1024 * GIB, "1.25 TiB"),
    ],
)
def test_bytes_read_in_binary_units_with_three_digits(count: float, text: str) -> None:
    assert binary_bytes(count) == text


def test_the_message_floors_the_percentage_and_names_the_rate_once_known() -> None:
    progress = LoadingProgress(12.34 * GIB, 300 * GIB, 850 * MIB)
    assert progress.message == "loading weights: 12.3 GiB of 300 GiB (4%) at 850 MiB/s"
    # One byte short is not 100%; without two samples yet there is no rate.
    almost = LoadingProgress(300 * GIB - 1, 300 * GIB, None)
    assert almost.message == "loading weights: 300 GiB of 300 GiB (99%)"
    assert almost.as_status() == {
        "bytesDone": 300 * GIB - 1,
        "bytesNeeded": 300 * GIB,
        "bytesPerSecond": None,
    }
    assert progress.as_status()["bytesPerSecond"] == 850 * MIB


def _conditions(reason: str, message: str, ready: bool = False) -> list[Condition]:
    return [
        Condition("Ready", ready, reason, message),
        Condition("Progressing", not ready, reason, message),
        Condition("Degraded", False, reason, message),
    ]


def test_loading_replaces_the_waiting_reasons_and_keeps_a_wait_for_nodes() -> None:
    progress = LoadingProgress(GIB, 4 * GIB, None)
    deploying = loading_conditions(_conditions("ServeApplicationDeploying", "x UPDATING"), progress)
    assert [(c.type, c.reason, c.message) for c in deploying[:2]] == [
        ("Ready", "Loading", "loading weights: 1.00 GiB of 4.00 GiB (25%)"),
        ("Progressing", "Loading", "loading weights: 1.00 GiB of 4.00 GiB (25%)"),
    ]
    assert deploying[2].reason == "ServeApplicationDeploying"  # Degraded: not its business
    nodes = "waiting for 1 GPU node(s): 1 of 2 worker nodes ready"
    (ready, *_) = loading_conditions(_conditions("WaitingForNodes", nodes), progress)
    assert ready.message == f"loading weights: 1.00 GiB of 4.00 GiB (25%); {nodes}"
    # Serving, or failed: progress changes nothing.
    for kept in (_conditions("Serving", "ok", ready=True), _conditions("KubeRayTooOld", "old")):
        assert loading_conditions(kept, progress) == kept


def test_the_status_holds_loading_only_while_given() -> None:
    from grokserve.operator.builders import Owner
    from grokserve.operator.replica import replica_plan
    from grokserve.operator.spec import parse_spec

    owner = Owner(name=NAME, namespace=NS)
    spec = parse_spec(yaml.safe_load(EXAMPLE.read_text())["spec"])
    plan = replica_plan(owner.name, spec)
    conditions, _ = serving_conditions(owner, spec, None)
    progress = LoadingProgress(GIB, 2 * GIB, 0.0)
    loading = build_status(
        owner, spec, plan, conditions, 0, generation=1, previous=None, loading=progress
    )
    assert loading["loading"] == {"bytesDone": GIB, "bytesNeeded": 2 * GIB, "bytesPerSecond": 0}
    # None: the status write removes the key (a finished load leaves no stale progress).
    assert (
        build_status(owner, spec, plan, conditions, 0, generation=1, previous=loading)["loading"]
        is None
    )


def test_prometheus_down_is_a_failure_not_an_error() -> None:
    failure = read_loading_progress(f"http://127.0.0.1:{free_port()}", NS, NAME, timeout_s=2)
    assert isinstance(failure, MetricFailure) and failure.reason == "PrometheusUnreachable"


# -- one reconcile pass: when Prometheus is asked, and what its answer (or none) makes ---------


def test_a_pass_asks_only_while_replicas_may_load_and_does_without_an_answer(kube: Any) -> None:
    from grokserve.operator import handlers
    from grokserve.operator.controller import run_pass
    from grokserve.operator.kube import Kube

    _server, api = kube
    api.install_crds(kuberay=True)
    body = copy.deepcopy(yaml.safe_load(EXAMPLE.read_text()))
    body["spec"]["autoscaling"] = {"enabled": False}
    api.create(f"{GROKDEPLOYMENTS}/namespaces/{NS}/grokdeployments", body)
    client = Kube(handlers._api_client())
    asked: list[tuple[str, str, str]] = []
    answer: list[LoadingProgress | None] = [LoadingProgress(GIB, 4 * GIB, 2 * MIB)]

    def probe(url: str, namespace: str, name: str) -> LoadingProgress | None:
        asked.append((url, namespace, name))
        return answer[0]

    def pass_over() -> Any:
        return run_pass(client, api.get(GD), loading=probe)

    pass_over()  # creates the RayService
    generation = api.get(RS)["metadata"]["generation"]
    api.merge_patch(
        f"{RS}/status", {"status": {"observedGeneration": generation, "activeServiceStatus": {}}}
    )
    # No prometheusUrl: nothing to ask, nothing to look at again.
    outcome = pass_over()
    assert not outcome.watches_loading and asked == []
    assert ready_condition(api.get(GD))["reason"] == "ServeApplicationPending"

    url = "http://prometheus.monitoring:9090"
    api.merge_patch(GD, {"spec": {"autoscaling": {"prometheusUrl": url}}})
    outcome = pass_over()
    assert outcome.watches_loading and asked == [(url, NS, NAME)]
    stored = api.get(GD)
    assert ready_condition(stored)["reason"] == "Loading"
    assert stored["status"]["loading"] == {
        "bytesDone": GIB,
        "bytesNeeded": 4 * GIB,
        "bytesPerSecond": 2 * MIB,
    }

    # Prometheus cannot say (down, no series): the status is as without it, and looks again.
    answer[0] = None
    outcome = pass_over()
    stored = api.get(GD)
    assert outcome.watches_loading and len(asked) == 2
    assert ready_condition(stored)["reason"] == "ServeApplicationPending"
    assert "loading" not in stored["status"]

    # Serving: nothing is asked.
    api.merge_patch(f"{RS}/status", {"status": rayservice_status(generation, 1)})
    outcome = pass_over()
    assert outcome.ready and not outcome.watches_loading and len(asked) == 2


def test_passes_close_together_share_one_answer_and_a_failure_is_logged_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """KubeRay's status events bring passes seconds apart: they must not each query Prometheus."""
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from types import SimpleNamespace

    queries: list[str] = []
    failing = threading.Event()

    class Prometheus(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            queries.append(self.path)
            answer = {"status": "success", "data": {"resultType": "scalar", "result": [0, "7"]}}
            body = json.dumps(answer).encode()
            self.send_response(503 if failing.is_set() else 200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(b"down" if failing.is_set() else body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Prometheus)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    operator = controller.Controller(SimpleNamespace(cache=None), workers=1, resync_s=60)
    try:
        assert operator._loading_progress(url, NS, NAME) == LoadingProgress(7, 7, 7)
        assert len(queries) == 3  # done, needed, rate
        operator._loading_progress(url, NS, NAME)
        assert len(queries) == 3  # an answer this young is reused
        monkeypatch.setattr(controller, "LOADING_REUSE_S", 0.0)
        failing.set()
        with caplog.at_level("WARNING", logger="grokserve.operator"):
            assert operator._loading_progress(url, NS, NAME) is None
            assert operator._loading_progress(url, NS, NAME) is None
        assert len(queries) == 9
        (line,) = [m for r in caplog.records if "loading progress" in (m := r.getMessage())]
        assert line.startswith(f"loading progress of {NS}/{NAME} unknown: ")
    finally:
        server.shutdown()
        server.server_close()
        operator._executor.shutdown()


# -- the operator, a real Prometheus, the replica's metrics ----------------------------------


def ready_condition(body: dict[str, Any] | None) -> dict[str, Any]:
    conditions = ((body or {}).get("status") or {}).get("conditions", [])
    return next((c for c in conditions if c["type"] == "Ready"), {})


@pytest.fixture
def replica() -> Iterator[tuple[ReplicaMetrics, PrometheusServer]]:
    """A replica's metrics (grokserve.serving's own) on HTTP, scraped by a real Prometheus with the
    namespace label Kubernetes service discovery adds."""
    metrics = ReplicaMetrics(NAME, "replica-a")
    port = free_port()
    server, thread = start_http_server(port, addr="127.0.0.1", registry=metrics.registry)
    try:
        target = ScrapeTarget(f"127.0.0.1:{port}", {"namespace": NS})
        with PrometheusServer([target]) as prometheus:
            prometheus.wait_for_targets_up(timeout_s=20)
            yield metrics, prometheus
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_status_shows_loading_progress_then_clears_when_ready(
    kube: Any, replica: tuple[ReplicaMetrics, PrometheusServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    _server, api = kube
    metrics, prometheus = replica
    # The operator runs in this process: look again every second, each time asking Prometheus.
    monkeypatch.setattr(controller, "LOADING_POLL_S", 1.0)
    monkeypatch.setattr(controller, "LOADING_REUSE_S", 0.5)
    api.install_crds(kuberay=True)
    body = copy.deepcopy(yaml.safe_load(EXAMPLE.read_text()))
    # The autoscaler off: its prometheusUrl still serves the loading progress.
    body["spec"]["autoscaling"].update(enabled=False, prometheusUrl=prometheus.url)

    def report(done: int, fetched: int, load_seconds: float | None = None) -> None:
        weights: dict[str, float] = {
            "done_bytes": done,
            "needed_bytes": 4 * GIB,
            "fetched_bytes": fetched,
        }
        if load_seconds is not None:
            weights["load_seconds"] = load_seconds
        metrics.record_weights_load([{"rank": 0, "weights": weights}])

    with running_operator():
        api.create(f"{GROKDEPLOYMENTS}/namespaces/{NS}/grokdeployments", body)
        rayservice = wait_until(lambda: api.get(RS), what="the RayService")
        generation = rayservice["metadata"]["generation"]
        # KubeRay has accepted it; the new cluster's application is not serving yet.
        api.merge_patch(
            f"{RS}/status",
            {"status": {"observedGeneration": generation, "activeServiceStatus": {}}},
        )
        pending = wait_until(
            lambda: (
                ready_condition(api.get(GD)).get("reason") == "ServeApplicationPending"
                and api.get(GD)
            ),
            what="ServeApplicationPending before any replica reports",
        )
        assert "loading" not in pending["status"]

        # 1 GiB of the 4 was in the node cache already; none fetched yet.
        report(done=GIB, fetched=0)
        loading = wait_until(
            lambda: (
                (api.get(GD)["status"].get("loading") or {}).get("bytesDone") == GIB and api.get(GD)
            ),
            what="status.loading at 1 GiB",
        )
        assert loading["status"]["loading"]["bytesNeeded"] == 4 * GIB
        ready = ready_condition(loading)
        assert (ready["status"], ready["reason"]) == ("False", "Loading")
        assert ready["message"].startswith("loading weights: 1.00 GiB of 4.00 GiB (25%)")

        # Bytes arrive: done grows, and once Prometheus has two samples, so does the rate.
        for step in range(1, 4):
            report(done=GIB + step * 256 * MIB, fetched=step * 256 * MIB)
            prometheus.wait_for(
                "grokserve_weights_bytes_fetched_total",
                lambda result, s=step: result and float(result[0]["value"][1]) == s * 256 * MIB,
                timeout_s=10,
            )
        final = GIB + 3 * 256 * MIB

        def moved() -> dict[str, Any] | None:
            body = api.get(GD)
            status = body["status"].get("loading") or {}
            return (
                body if status.get("bytesDone") == final and status.get("bytesPerSecond") else None
            )

        moving = wait_until(moved, what="1.75 GiB done at a positive rate")
        status = moving["status"]["loading"]
        assert status["bytesNeeded"] == 4 * GIB and status["bytesPerSecond"] > 0
        assert " at " in ready_condition(moving)["message"]
        assert ready_condition(moving)["message"].startswith("loading weights: 1.75 GiB of 4.00")

        # Loaded, and KubeRay reports the application healthy: Ready, and no progress left.
        report(done=4 * GIB, fetched=3 * GIB, load_seconds=42.0)
        api.merge_patch(f"{RS}/status", {"status": rayservice_status(generation, 1)})
        done = wait_until(
            lambda: ready_condition(api.get(GD)).get("status") == "True" and api.get(GD),
            what="Ready=True",
        )
        assert "loading" not in done["status"]
