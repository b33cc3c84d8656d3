"""A shard worker killed under a running replica: clients see 503 + Retry-After (never a 500),
/readyz answers 503, and the replica comes back by itself."""

import os
import signal
import time

import httpx
import pytest

from grokserve.serving.config import ServingConfig
from testkit.serving import LIMITS, MODEL

pytestmark = pytest.mark.slow
NAME = "grok-failover"


@pytest.fixture(scope="module")
def failover_url(serving):
    config = ServingConfig(name=NAME, model={"preset": MODEL}, serving=LIMITS)
    url = serving.deploy(config, "failover", "/failover")
    yield url
    serving.delete("failover")


def test_a_killed_shard_worker_gives_503s_until_the_replica_is_replaced(failover_url):
    body = {"model": NAME, "prompt": "Hello", "max_tokens": 4, "temperature": 0}
    with httpx.Client(base_url=failover_url, timeout=60) as http:
        assert http.post("/v1/completions", json=body).status_code == 200
        worker = http.get("/v1/placement").json()["shards"][0]["pid"]
        os.kill(worker, signal.SIGKILL)
        killed = time.monotonic()
        statuses, ready, recovered = [], [], None
        while time.monotonic() - killed < 120:
            response = http.post("/v1/completions", json=body)
            statuses.append(response.status_code)
            if response.status_code == 503:
                assert int(response.headers["Retry-After"]) >= 1
                error = response.json()["error"]
                assert error["type"] == "service_unavailable_error", error
                assert "Ray" not in error["message"], error
            ready.append(http.get("/readyz").status_code)
            if response.status_code == 200 and 503 in statuses:
                recovered = time.monotonic() - killed
                break
            time.sleep(0.2)
    assert set(statuses) <= {200, 503}, statuses
    assert 503 in statuses, "the dead worker was never noticed"
    assert 503 in ready, "/readyz kept answering 200 while the replica could not serve"
    assert recovered is not None, f"not serving again 120 s after the kill: {statuses[-5:]}"
    print(f"recovered {recovered:.1f} s after the kill")
