"""The Prometheus client against a real Prometheus, and against small servers that misbehave."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.metrics_core import Metric

from grokserve.operator.autoscaling.policy import (
    MetricFailure,
    PolicyConfig,
    QueueSample,
    Reason,
    ScalingPolicy,
)
from grokserve.operator.autoscaling.prometheus import (
    PrometheusClient,
    QueryTemplateError,
    render_query,
)
from grokserve.serving.metrics import ZeroDemand
from testkit.prometheus import PrometheusServer, ScrapeTarget, TestExporter, free_port


@pytest.fixture(scope="module")
def prometheus() -> Iterator[PrometheusServer]:
    # No targets: every query below is answered from PromQL alone.
    with PrometheusServer([]) as server:
        yield server


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client_session:
        yield client_session


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("vector(3)", 3.0),
        ("scalar(vector(2.5))", 2.5),
        ("sum(vector(0))", 0.0),
        ("absent(vector(1))", "NoSeries"),  # an empty instant vector
        ('label_replace(vector(1), "a", "x", "", "") or vector(2)', "SeveralSeries"),
        ("vector(0) / 0", "NotANumber"),
        ("vector(1) / 0", "NonNumericResult"),  # +Inf
        ("vector(-1)", "NegativeValue"),
        ('"queued"', "NonNumericResult"),  # a string result
        ("sum(", "PrometheusQueryError"),
    ],
)
async def test_query_results_are_numbers_or_classified_failures(
    prometheus: PrometheusServer,
    session: aiohttp.ClientSession,
    query: str,
    expected: float | str,
) -> None:
    result = await PrometheusClient(prometheus.url, session).scalar(query)
    if isinstance(expected, str):
        assert isinstance(result, MetricFailure), result
        assert result.reason == expected
        assert query in result.message or expected == "PrometheusQueryError"
    else:
        assert result == expected


async def test_queue_sample_substitutes_the_deployment_into_an_override_query(
    prometheus: PrometheusServer, session: aiohttp.ClientSession
) -> None:
    client = PrometheusClient(prometheus.url, session)
    # The override reports the name's length, which proves $name was substituted; no series of
    # grokserve_requests_running exists, so the running count is unknown (None), not a failure.
    query = 'vector(4) + count(label_replace(vector(1), "n", "$name", "", ""))'
    sample = await client.queue_sample("llm", "grok-1", waiting_query=query)
    assert sample == QueueSample(waiting=5.0, running=None)
    failure = await client.queue_sample("llm", "grok-1")
    assert isinstance(failure, MetricFailure) and failure.reason == "NoSeries"
    assert 'grokserve_requests_waiting{namespace="llm",deployment="grok-1"}' in failure.message


async def test_a_replica_scraped_through_every_proxy_counts_once(
    session: aiohttp.ClientSession,
) -> None:
    # Each Serve proxy answers /metrics with every replica's series, so Prometheus sees each
    # replica once per node; the default queries must not multiply the queue by the node count.
    with TestExporter() as exporter:
        labels = ("deployment", "replica")
        waiting = exporter.gauge("grokserve_requests_waiting", "waiting", labels)
        running = exporter.gauge("grokserve_requests_running", "running", labels)
        waiting.labels("grok-1", "a").set(3)
        waiting.labels("grok-1", "b").set(2)
        waiting.labels("other", "a").set(100)
        running.labels("grok-1", "a").set(4)
        proxies = [
            ScrapeTarget(f"{host}:{exporter.port}", {"namespace": "llm"})
            for host in ("127.0.0.1", "localhost")
        ]
        with PrometheusServer(proxies) as prometheus:
            prometheus.wait_for_targets_up()
            sample = await PrometheusClient(prometheus.url, session).queue_sample("llm", "grok-1")
    assert sample == QueueSample(waiting=5.0, running=4.0)


class _Exported:
    def __init__(self, demand: ZeroDemand) -> None:
        self._demand = demand

    def collect(self) -> list[Metric]:
        return self._demand.snapshot()


async def test_a_request_refused_at_zero_is_the_waiting_that_wakes_the_deployment(
    session: aiohttp.ClientSession,
) -> None:
    # At zero replicas only the API ingress exports grokserve_requests_waiting (ZeroDemand, what
    # it serves at /metrics): the built-in query reads it, and the policy scales 0 -> 1.
    demand = ZeroDemand("grok-1", "ingress:a", retry_after_seconds=5, window_seconds=60)
    policy = ScalingPolicy(
        PolicyConfig(
            min_replicas=0,
            max_replicas=4,
            target_queue_per_replica=8,
            tolerance=0.1,
            scale_up_stabilization_s=0,
            scale_down_stabilization_s=0,
            idle_window_s=60,
        )
    )
    with TestExporter() as exporter:
        exporter.registry.register(_Exported(demand))
        target = ScrapeTarget(exporter.address, {"namespace": "llm"})
        with PrometheusServer([target]) as prometheus:
            prometheus.wait_for_targets_up()
            client = PrometheusClient(prometheus.url, session)
            idle = await client.queue_sample("llm", "grok-1")
            # No replica reports a running count at zero.
            assert idle == QueueSample(waiting=0.0, running=None)
            assert policy.decide(0, 0, 0, idle).replicas == 0

            demand.refused()
            prometheus.wait_for(
                'grokserve_requests_waiting{deployment="grok-1"}',
                lambda result: result and float(result[0]["value"][1]) > 0,
                timeout_s=20,
            )
            woken = await client.queue_sample("llm", "grok-1")
    assert woken == QueueSample(waiting=1.0, running=None)
    decision = policy.decide(10, 0, 0, woken)
    assert (decision.replicas, decision.reason) == (1, Reason.SCALE_FROM_ZERO)


async def test_unreachable_prometheus_is_reported_as_such(session: aiohttp.ClientSession) -> None:
    result = await PrometheusClient(f"http://127.0.0.1:{free_port()}", session).scalar("vector(1)")
    assert isinstance(result, MetricFailure) and result.reason == "PrometheusUnreachable"


async def _serve(handler: web.RequestHandler) -> tuple[web.AppRunner, str]:
    app = web.Application()
    app.router.add_get("/api/v1/query", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, f"http://127.0.0.1:{port}"


async def test_slow_prometheus_times_out(session: aiohttp.ClientSession) -> None:
    released = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        await released.wait()
        return web.json_response(
            {"status": "success", "data": {"resultType": "vector", "result": []}}
        )

    runner, url = await _serve(slow)
    try:
        result = await PrometheusClient(url, session, timeout_s=0.3).scalar("vector(1)")
    finally:
        released.set()
        await runner.cleanup()
    assert isinstance(result, MetricFailure) and result.reason == "PrometheusTimeout"
    assert "0.3s" in result.message


async def test_a_proxy_error_page_is_a_bad_response(session: aiohttp.ClientSession) -> None:
    async def html(request: web.Request) -> web.Response:
        return web.Response(status=502, text="<html>Bad Gateway</html>", content_type="text/html")

    runner, url = await _serve(html)
    try:
        result = await PrometheusClient(url, session).scalar("vector(1)")
    finally:
        await runner.cleanup()
    assert isinstance(result, MetricFailure) and result.reason == "PrometheusBadResponse"
    assert "HTTP 502" in result.message


def test_query_templates() -> None:
    assert render_query('x{namespace="$namespace",deployment="${name}"}', "llm", "g") == (
        'x{namespace="llm",deployment="g"}'
    )
    assert render_query("a $$ b", "n", "d") == "a $ b"
    with pytest.raises(QueryTemplateError, match=r"unknown placeholder \$replica"):
        render_query('x{replica="$replica"}', "n", "d")
    with pytest.raises(QueryTemplateError, match=r"literal \$"):
        render_query("x $", "n", "d")


def test_bad_url_is_rejected() -> None:
    with pytest.raises(ValueError, match="http:// or https://"):
        PrometheusClient("prometheus:9090", session=None)  # type: ignore[arg-type]
