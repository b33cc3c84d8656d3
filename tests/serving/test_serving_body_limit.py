"""The ingress's body limit in-process (an ASGI app, no Ray): what reaches the app, 413, 408."""

import asyncio
import json

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from grokserve.serving import ingress


async def _echo_size(request: Request) -> JSONResponse:
    return JSONResponse({"size": len(await request.body())})


def limited_app(limit: int) -> Starlette:
    app = Starlette(routes=[Route("/", _echo_size, methods=["POST"])])
    app.add_middleware(ingress.BodyLimit)
    app.state.max_request_bytes = limit
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
