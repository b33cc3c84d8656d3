"""The admission gates in-process: what the ingress and Serve's proxy refuse without asking the
scheduler."""

import asyncio
import json

from ray.serve._private.utils import call_function_from_import_path

from grokserve.serving.admission import (
    CAPACITY_HEADER,
    GENERATION_ROUTES,
    REFUSALS_HEADER,
    AdmissionGate,
    Refusal,
)
from grokserve.serving.config import PROXY_ENVIRONMENT
from grokserve.serving.proxy_gate import ProxyAdmissionGate

FULL = Refusal("the request queue is full (maxQueuedRequests=8); retry later", "rate_limit", 2)


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def forwarded(gate):
    """Whether the next request goes to the scheduler (taking a pass if the gate is closed)."""
    _, refusal = gate.check()
    return refusal is None


def test_an_open_gate_forwards_everything_without_passes():
    gate = AdmissionGate(Clock())
    assert gate.check() == (False, None)
    gate.admitted()
    gate.finished()
    assert all(forwarded(gate) for _ in range(100))


def test_after_full_it_repeats_the_refusal_until_a_slot_frees():
    gate = AdmissionGate(Clock())
    gate.refused(FULL)
    assert [gate.check() for _ in range(3)] == [(False, FULL)] * 3
    gate.finished()  # an admitted request ended: one request may ask the scheduler
    assert gate.check() == (True, None)
    assert gate.check() == (False, FULL)


def test_admissions_open_it_up_and_a_refusal_closes_it_again():
    gate = AdmissionGate(Clock())
    gate.refused(FULL)
    gate.finished()
    assert gate.check() == (True, None)
    gate.admitted()  # there was room: two more may ask, then four
    assert [forwarded(gate) for _ in range(3)] == [True, True, False]
    gate.admitted()
    gate.admitted()
    assert sum(forwarded(gate) for _ in range(10)) == 4
    gate.refused(FULL)
    assert not forwarded(gate)


def test_a_pass_without_an_answer_is_given_back():
    gate = AdmissionGate(Clock())
    gate.refused(FULL)
    gate.finished()
    assert gate.check() == (True, None)
    gate.give_back()  # e.g. the request was invalid (400): the next one may ask instead
    assert gate.check() == (True, None)
    assert not forwarded(gate)


def test_a_closed_gate_asks_again_after_the_retry_after_it_answered():
    clock = Clock()
    gate = AdmissionGate(clock)
    gate.refused(FULL)
    clock.now += FULL.retry_after - 0.1
    assert not forwarded(gate)
    clock.now += 0.1
    assert gate.check() == (True, None), "nothing seen for Retry-After: one request asks"
    assert not forwarded(gate)
    clock.now += FULL.retry_after
    assert forwarded(gate)


def test_serves_proxy_finds_the_gate_where_the_environment_says():
    path = PROXY_ENVIRONMENT["RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"]
    (middleware,) = call_function_from_import_path(path)
    assert middleware.cls is ProxyAdmissionGate


class FakeIngress:
    """An ASGI app in the ingress's place: tells its capacity (2) on every response, holds
    generation requests until `release` is set, and records the headers it was sent."""

    def __init__(self):
        self.release = asyncio.Event()
        self.seen_headers = []

    async def __call__(self, scope, receive, send):
        self.seen_headers.append(dict(scope["headers"]))
        told = {"prefix": "", "capacity": 2, "retryAfter": 1, "body": '{"error":"full"}'}
        headers = [(CAPACITY_HEADER.encode(), json.dumps(told).encode())]
        if scope["path"] in GENERATION_ROUTES:
            await self.release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"ok"})


async def call(app, path, method="POST", headers=(), uploading=False):
    scope = {"type": "http", "method": method, "path": path, "headers": list(headers)}
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"{", "more_body": uploading}

    async def send(message):
        sent.append(message)

    await app(scope, receive, send)
    return sent[0]["status"], dict(sent[0]["headers"]), sent[-1]["body"]


async def test_the_proxy_refuses_beyond_the_capacity_the_ingress_told_it():
    ingress = FakeIngress()
    proxy = ProxyAdmissionGate(ingress)
    status, headers, _ = await call(proxy, "/readyz", "GET")
    assert status == 200 and CAPACITY_HEADER.encode() not in headers, "the header stays inside"
    held = [asyncio.create_task(call(proxy, "/v1/completions")) for _ in range(2)]
    await asyncio.sleep(0.05)
    status, headers, body = await call(proxy, "/v1/chat/completions")
    assert (status, headers[b"retry-after"], body) == (429, b"1", b'{"error":"full"}')
    assert len(ingress.seen_headers) == 3, "the refused request never reached the ingress"
    # A body still being uploaded is not near admission: the ingress's limits judge it.
    upload = asyncio.create_task(call(proxy, "/v1/completions", uploading=True))
    await asyncio.sleep(0.05)
    assert len(ingress.seen_headers) == 4
    # The next request forwarded to the app reports the refusal.
    assert ingress.seen_headers[-1][REFUSALS_HEADER.encode()] == b"/v1/chat/completions=1"
    ingress.release.set()
    assert [(await task)[0] for task in [*held, upload]] == [200, 200, 200]
    status, _, _ = await call(proxy, "/v1/completions")
    assert status == 200, "answered requests free their places"
    # A client cannot report refusals.
    await call(proxy, "/metrics", "GET", [(REFUSALS_HEADER.encode(), b"/v1/completions=99")])
    assert REFUSALS_HEADER.encode() not in ingress.seen_headers[-1]


async def test_the_ingress_tells_the_proxy_its_capacity_and_the_429_it_would_answer():
    from grokserve.serving.config import ServingConfig
    from grokserve.serving.ingress import CapacityNotice

    config = ServingConfig(replicas=2, serving={"maxBatchSize": 4, "maxQueuedRequests": 3})
    notice = CapacityNotice(config)
    sent = []

    async def send(message):
        sent.append(message)

    await notice.telling(send, "/bench0")({"type": "http.response.start", "status": 200})
    told = json.loads(dict(sent[0]["headers"])[CAPACITY_HEADER.encode()])
    assert (told["prefix"], told["capacity"], told["retryAfter"]) == ("/bench0", 14, 1)
    error = json.loads(told["body"])["error"]
    assert error["code"] == "rate_limit_exceeded" and "maxQueuedRequests=3" in error["message"]
    notice.replicas = 3  # as ReplicaWatch sets it when Serve runs another replica
    assert json.loads(notice.header("/bench0"))["capacity"] == 21


async def test_without_the_proxys_gate_the_ingress_tells_no_capacity_and_believes_no_report(
    monkeypatch,
):
    """A cluster whose proxies lack the gate (joined at RAY_ADDRESS): clients must not see the
    capacity header, nor inflate the 429 count by sending the gate's refusal report."""
    from types import SimpleNamespace

    from starlette.datastructures import State

    from grokserve.serving.config import ServingConfig, proxy_gate_installed
    from grokserve.serving.ingress import AdmissionGateCheck, CapacityNotice

    for key in PROXY_ENVIRONMENT:
        monkeypatch.delenv(key, raising=False)
    assert not proxy_gate_installed()
    monkeypatch.setenv(*next(iter(PROXY_ENVIRONMENT.items())))
    assert proxy_gate_installed()

    counted = []

    class Metrics:
        def on_response(self, route, status, count=1):
            counted.append((route, status, count))

    async def ingress(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    async def scrape(state) -> dict:
        sent = []

        async def send(message):
            sent.append(message)

        async def receive():
            return {"type": "http.request", "body": b""}

        report = [(REFUSALS_HEADER.encode(), b"/v1/completions=5")]
        scope = {
            "type": "http",
            "method": "GET",
            "path": "/metrics",
            "headers": report,
            "app": SimpleNamespace(state=state),
        }
        await AdmissionGateCheck(ingress)(scope, receive, send)
        return dict(sent[0]["headers"])

    state = State()
    state.request_metrics = Metrics()
    assert CAPACITY_HEADER.encode() not in await scrape(state) and counted == []
    state.capacity_notice = CapacityNotice(ServingConfig())  # as with the gate in front
    assert CAPACITY_HEADER.encode() in await scrape(state)
    assert counted == [("/v1/completions", 429, 5)]
