"""At zero model replicas the endpoint still answers: a generation request gets a fast 503 +
Retry-After (`scaled_to_zero`), /readyz says why it is not ready, /metrics counts the request as
waiting (the autoscaler's signal to wake the deployment), and once the model deployment has a
replica again the same request succeeds.

The app at zero is deployed with the GrokReplica options the operator writes at replicas 0
(`ServingConfig.replica_count_options`, through `build_app`).
"""

import re
import time

import httpx
import pytest

from grokserve.serving.config import ServingConfig
from grokserve.serving.metrics import MergedMetrics, ReplicaMetrics, ZeroDemand
from testkit.serving import LIMITS, MODEL

NAME = "grok-zero"
WAITING = re.compile(
    r'^grokserve_requests_waiting\{deployment="grok-zero",replica="ingress:[^"]+"\} (\S+)$',
    re.MULTILINE,
)


def config(replicas: int) -> ServingConfig:
    return ServingConfig(name=NAME, replicas=replicas, model={"preset": MODEL}, serving=LIMITS)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_refusals_at_zero_count_the_clients_that_wait_not_their_retries() -> None:
    clock = Clock()
    demand = ZeroDemand("grok", "ingress:a", retry_after_seconds=5, window_seconds=60, clock=clock)
    assert demand.waiting() == 0
    demand.refused()
    assert demand.waiting() == 1  # one request never retried still asks for a replica
    clock.now += 61
    assert demand.waiting() == 0  # no longer waiting after the window
    # 10 clients, each retrying every Retry-After for a minute: 10 waiting, not 120.
    for _ in range(12):
        clock.now += 5
        for _ in range(10):
            demand.refused()
    assert demand.waiting() == 10
    clock.now += 61
    assert demand.waiting() == 0


def test_the_ingress_demand_merges_into_the_replicas_waiting_family() -> None:
    demand = ZeroDemand("grok", "ingress:a", retry_after_seconds=5, window_seconds=60)
    demand.refused()
    replica = ReplicaMetrics("grok", "r1")
    replica.on_state(waiting=3, running=1, kv_usage=0.1)
    hub = MergedMetrics()
    hub.update("r1", replica.snapshot())
    text = hub.render(demand.snapshot()).decode()
    # One HELP per family (two would be an invalid exposition), both replicas' samples in it.
    assert text.count("# HELP grokserve_requests_waiting ") == 1
    assert 'grokserve_requests_waiting{deployment="grok",replica="r1"} 3.0' in text
    assert 'grokserve_requests_waiting{deployment="grok",replica="ingress:a"} 1.0' in text


@pytest.mark.slow
def test_a_request_at_zero_gets_a_503_counts_as_waiting_and_succeeds_once_scaled_up(serving):
    url = serving.deploy(config(0), "zero", "/zero")
    body = {"model": NAME, "prompt": "Hello", "max_tokens": 2, "temperature": 0}
    try:
        with httpx.Client(base_url=url, timeout=60) as http:
            waiting_before = [float(v) for v in WAITING.findall(http.get("/metrics").text)]
            assert waiting_before == [0.0]

            started = time.monotonic()
            response = http.post("/v1/completions", json=body)
            took = time.monotonic() - started
            assert response.status_code == 503, response.text
            assert int(response.headers["Retry-After"]) >= 1
            error = response.json()["error"]
            assert error["code"] == "scaled_to_zero", error
            assert error["type"] == "service_unavailable_error", error
            assert "scaled to zero" in error["message"], error
            # Answered by the ingress: no replica was waited for.
            assert took < 2.0, f"the 503 at zero took {took:.2f} s"

            ready = http.get("/readyz")
            assert ready.status_code == 503
            assert ready.json()["error"]["code"] == "scaled_to_zero"
            # The tokenizer routes need a replica too: refused the same way, not held.
            assert http.post("/tokenize", json={"prompt": "Hi"}).status_code == 503

            (waiting,) = (float(v) for v in WAITING.findall(http.get("/metrics").text))
            assert waiting >= 1, "the refused request is not exported as waiting"

        url = serving.deploy(config(1), "zero", "/zero")
        with httpx.Client(base_url=url, timeout=60) as http:
            response = http.post("/v1/completions", json=body)
            assert response.status_code == 200, response.text
            assert http.get("/readyz").status_code == 200
    finally:
        serving.delete("zero")
    print(f"503 at zero in {took * 1000:.0f} ms")
