"""The ingress's body limit in-process (an ASGI app, no Ray): what reaches the app, 413, 408, and
the budget of body bytes in flight (503)."""

import asyncio
import json

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from grokserve.serving import ingress
from grokserve.serving.metrics import RequestMetrics


async def _echo_size(request: Request) -> JSONResponse:
    return JSONResponse({"size": len(await request.body())})


def limited_app(limit: int, in_flight: int = 1 << 30) -> Starlette:
    app = Starlette(routes=[Route("/", _echo_size, methods=["POST"])])
    app.add_middleware(ingress.BodyLimit)
    app.state.max_request_bytes = limit
    app.state.body_budget = ingress.BodyBudget(in_flight)
    return app


async def call(app, parts, headers=(), stall=False):
    """POST `parts` as body messages (then nothing more if `stall`); the status and JSON body."""
    messages = [
        {"type": "http.request", "body": part, "more_body": stall or i < len(parts) - 1}
        for i, part in enumerate(parts)
    ]
    sent = []

    async def receive():
        if messages:
            return messages.pop(0)
        await asyncio.sleep(3600)  # a client that stopped sending

    async def send(message):
        sent.append(message)

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/",
        "headers": [(k.encode(), v.encode()) for k, v in headers],
        "query_string": b"",
    }
    await app(scope, receive, send)
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return sent[0]["status"], json.loads(body)


async def test_a_body_within_the_limit_reaches_the_app_whole():
    assert await call(limited_app(1024), [b"a" * 600, b"b" * 424]) == (200, {"size": 1024})


async def test_a_declared_or_streamed_body_over_the_limit_is_a_413():
    app = limited_app(1024)
    status, body = await call(app, [b"x"], headers=[("content-length", "5000")])
    assert status == 413 and body["error"]["code"] == "request_too_large"
    status, body = await call(app, [b"a" * 600, b"b" * 600])
    assert status == 413 and "1024 bytes" in body["error"]["message"]


async def test_a_half_sent_body_times_out_with_408(monkeypatch):
    monkeypatch.setattr(ingress, "BODY_TIMEOUT_SECONDS", 0.2)
    status, body = await call(limited_app(1024), [b"a" * 10], stall=True)
    assert status == 408 and body["error"]["code"] == "timeout"


async def test_other_methods_pass_through():
    app = limited_app(1024)
    sent = []

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "GET", "path": "/", "headers": [], "query_string": b""}
    await app(scope, lambda: None, send)
    assert sent[0]["status"] == 405  # the route's own answer: nothing was read or refused


def bytes_in_flight(app) -> float:
    """The ingress's gauge, as /metrics shows it."""
    metrics = RequestMetrics("grok", lambda: app.state.body_budget.in_flight)
    value = metrics.registry.get_sample_value(
        "grokserve_ingress_body_bytes_in_flight", {"deployment": "grok"}
    )
    assert value is not None
    return value


async def test_uploads_beyond_the_bytes_in_flight_get_503_at_once_and_a_small_one_passes(
    monkeypatch,
):
    monkeypatch.setattr(ingress, "BODY_TIMEOUT_SECONDS", 1.0)
    app = limited_app(4096, in_flight=10_000)
    # Eight half-sent 4000-byte uploads: two fit in the budget and stall; six are refused.
    stalled = [
        asyncio.create_task(
            call(app, [b"a" * 100], headers=[("content-length", "4000")], stall=True)
        )
        for _ in range(8)
    ]
    # Refused within half the body timeout: none of them waited for bytes that never came.
    done, pending = await asyncio.wait(stalled, timeout=0.5)
    assert len(done) == 6 and len(pending) == 2
    for task in done:
        status, body = task.result()
        assert status == 503 and body["error"]["code"] == "request_bytes_in_flight_exceeded"
        assert "maxRequestBytesInFlight" in body["error"]["message"]
    assert bytes_in_flight(app) == 8000
    # A chunked upload (no Content-Length) is refused as soon as its bytes pass the budget.
    status, _ = await call(app, [b"c" * 1000, b"c" * 1500])
    assert status == 503
    assert await call(app, [b"small" * 20]) == (200, {"size": 100})
    # The stalled uploads time out and give their bytes back.
    assert [(await task)[0] for task in pending] == [408, 408]
    assert bytes_in_flight(app) == 0
    assert await call(app, [b"a" * 4000], headers=[("content-length", "4000")]) == (
        200,
        {"size": 4000},
    )
    assert bytes_in_flight(app) == 0


async def test_the_503_carries_retry_after():
    app = limited_app(4096, in_flight=4096)
    app.state.body_budget.take(4096)
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"x", "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/", "headers": [], "query_string": b""}
    await app(scope, receive, send)
    assert sent[0]["status"] == 503 and (b"retry-after", b"1") in sent[0]["headers"]


async def test_a_client_that_disconnects_mid_body_gives_its_bytes_back():
    app = limited_app(4096, in_flight=10_000)
    messages = [
        {"type": "http.request", "body": b"a" * 500, "more_body": True},
        {"type": "http.disconnect"},
    ]

    async def receive():
        return messages.pop(0)

    async def send(message):
        raise AssertionError("nothing is sent to a client that left")

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/",
        "headers": [(b"content-length", b"3000")],
        "query_string": b"",
    }
    await app(scope, receive, send)
    assert bytes_in_flight(app) == 0
