"""Refusals in Serve's HTTP proxy: what cannot fit is answered before the hop to the ingress.

The replicas hold at most `capacity` requests at once (maxBatchSize running + maxQueuedRequests
waiting, each). Under a burst of 10x that on 2 cores, the path proxy -> ingress -> replica and back
took seconds per refusal, and all of a burst's requests are forwarded before the first refusal
comes back, so no gate fed by refusals can help it. This proxy counts instead: a generation request
whose body has arrived whole is held from then until its answer ends (a 200's last byte; any other
status at once).
While it holds `capacity` requests of an application, one more cannot be admitted (each held
request takes at least one place, and the other proxies' requests only take more), so it answers
the 429 the ingress would, at once. Its count can only be too high while refusals are on their way
back, which makes it refuse early for that long; the ingress and its scheduler judge every request
it lets through.

The ingress tells it the capacity and the 429 (`CAPACITY_HEADER`, on every response: the launcher's
readiness check teaches it before the first request); it reports its refusals back to the ingress
in `REFUSALS_HEADER` on the next request it forwards to the same application (e.g. the next scrape
of /metrics), which counts them in grokserve_http_requests_total.

Serve installs it from `RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH` (see
`grokserve.serving.config.PROXY_ENVIRONMENT`), which must be set where the proxies start: the
launcher does it for a cluster it starts, the operator on the Ray pods.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from starlette.middleware import Middleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from grokserve.serving.admission import CAPACITY_HEADER, GENERATION_ROUTES, REFUSALS_HEADER

_CAPACITY = CAPACITY_HEADER.encode()
_REFUSALS = REFUSALS_HEADER.encode()


@dataclass
class _App:
    """One application (route prefix) as this proxy sees it."""

    capacity: int | None = None  # None: not told yet, nothing is refused here
    refusal: list[Message] = field(default_factory=list)  # the 429's start and body
    held: int = 0
    unreported: Counter[str] = field(default_factory=Counter)  # route -> refusals made here

    def learn(self, info: dict[str, Any]) -> None:
        body = info["body"].encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"retry-after", str(info["retryAfter"]).encode()),
        ]
        self.capacity = info["capacity"]
        self.refusal = [
            {"type": "http.response.start", "status": 429, "headers": headers},
            {"type": "http.response.body", "body": body},
        ]


def _replaying(first: Message, receive: Receive) -> Receive:
    """`receive`, with `first` (already received) given first."""
    pending = [first]

    async def replay() -> Message:
        return pending.pop() if pending else await receive()

    return replay


def _generation_route(scope: Scope) -> str | None:
    if scope["method"] != "POST":
        return None
    return next((r for r in GENERATION_ROUTES if scope["path"].endswith(r)), None)


class ProxyAdmissionGate:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.apps: dict[str, _App] = {}  # by route prefix
        self._told = b""  # the last header learned from (it changes with the replica count)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = _generation_route(scope)
        entry = None
        if route is not None:
            # Only a request whose body is all here can be admitted soon, and be held: a large
            # or slow upload is left to the ingress's limits (it passes uncounted).
            first = await receive()
            receive = _replaying(first, receive)
            if first["type"] == "http.request" and not first.get("more_body", False):
                entry = self.apps.setdefault(scope["path"].removesuffix(route), _App())
                if entry.capacity is not None and entry.held >= entry.capacity:
                    entry.unreported[route] += 1
                    for message in entry.refusal:
                        await send(message)
                    return
        # Only this proxy reports refusals: a client's header of that name is dropped.
        headers = [(k, v) for k, v in scope["headers"] if k.lower() != _REFUSALS]
        report = self._take_report(scope["path"])
        if report:
            headers.append((_REFUSALS, report.encode()))
        scope = {**scope, "headers": headers}
        if entry is None:
            await self.app(scope, receive, self._learning(send))
        else:
            await self._holding(entry, scope, receive, send)

    async def _holding(self, entry: _App, scope: Scope, receive: Receive, send: Send) -> None:
        """Forward a generation request, held in `entry` until its answer ends."""
        entry.held += 1
        held = True

        def release() -> None:
            nonlocal held
            if held:
                held = False
                entry.held -= 1

        learning = self._learning(send)

        async def observe(message: Message) -> None:
            # Not admitted (or failed) at its start; a 200 when its last byte is sent.
            refused = message["type"] == "http.response.start" and message["status"] != 200
            done = message["type"] == "http.response.body" and not message.get("more_body", False)
            if refused or done:
                release()
            await learning(message)

        try:
            await self.app(scope, receive, observe)
        finally:
            release()

    def _learning(self, send: Send) -> Send:
        """`send`, learning the capacity from (and removing) the ingress's header."""

        async def learning(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = message.get("headers", [])
                told = next((v for k, v in headers if k.lower() == _CAPACITY), None)
                if told is not None:
                    if told != self._told:
                        info = json.loads(told)
                        self.apps.setdefault(info["prefix"], _App()).learn(info)
                        self._told = told
                    kept = [(k, v) for k, v in headers if k.lower() != _CAPACITY]
                    message = {**message, "headers": kept}
            await send(message)

        return learning

    def _take_report(self, path: str) -> str:
        """The unreported refusals of the application `path` belongs to (the longest prefix)."""
        owners = [p for p in self.apps if path == p or path.startswith(p + "/")]
        if not owners:
            return ""
        unreported = self.apps[max(owners, key=len)].unreported
        report = ",".join(f"{route}={count}" for route, count in unreported.items())
        unreported.clear()
        return report


def middlewares() -> list[Middleware]:
    """What Serve's proxy calls (RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH)."""
    return [Middleware(ProxyAdmissionGate)]
