"""The HTTP ingress: OpenAI-compatible routes, vLLM's tokenizer routes, SSE streaming, errors in
OpenAI's shape, /metrics.

Admission happens in the replica's scheduler only (see `grokserve.serving.app`): this layer
bounds what it reads (the body size), validates, and turns the replica's events into responses. Its
admission gate repeats the scheduler's "full" without asking it again while nothing has freed
room (`grokserve.serving.admission`), so that refusals under a burst come at once.
"""

import asyncio
import json
import logging
import threading
import time
from collections.abc import AsyncIterator
from typing import Any, cast

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from ray import serve
from ray.exceptions import RayError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator
from ray.serve.schema import DeploymentStatus, ReplicaState
from starlette.datastructures import State
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from grokserve.serving.admission import (
    CAPACITY_HEADER,
    GENERATION_ROUTES,
    QUEUE_FULL_CODE,
    REFUSALS_HEADER,
    AdmissionGate,
    Refusal,
    queue_full_message,
)
from grokserve.serving.config import REPLICA_DEPLOYMENT, ServingConfig, proxy_gate_installed
from grokserve.serving.metrics import RequestMetrics, ZeroDemand
from grokserve.serving.requests import GenerateRequest
from grokserve.serving.schemas import (
    CHAT_STOP,
    CHAT_TEMPLATE,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    ErrorBody,
    ErrorResponse,
    InvalidUnicode,
    ModelCard,
    ModelList,
    SamplingFields,
    TokenizeRequest,
    UnsupportedParameter,
    chat_choice,
    chat_chunk_choice,
    chat_logprobs,
    completion_choice,
    completion_logprobs,
    new_id,
    now,
    render_chat,
)

log = logging.getLogger(__name__)

READY_TIMEOUT_SECONDS = 5.0
# A replica answers admitted-or-refused at once; longer means none is serving (being replaced).
ADMISSION_TIMEOUT_SECONDS = 10.0
# Between two parts of a request body: a slow or half-sent upload is cut off after this.
BODY_TIMEOUT_SECONDS = 30.0
RETRY_AFTER_UNAVAILABLE = 5
# How often the ingress reads the model deployment's replicas (for Serve's proxy, and zero).
REPLICA_COUNT_SECONDS = 2.0
# At zero replicas: how long a refused request counts as waiting demand (ZeroDemand). It
# outlasts a Prometheus scrape (15 s) and an operator autoscaler period together.
ZERO_DEMAND_WINDOW_SECONDS = 60.0
SCALED_TO_ZERO_CODE = "scaled_to_zero"
_CAPACITY = CAPACITY_HEADER.encode()


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after: int | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.param = param
        self.code = code
        self.retry_after = retry_after


def unavailable(message: str) -> ApiError:
    return ApiError(503, message, code="service_unavailable", retry_after=RETRY_AFTER_UNAVAILABLE)


def scaled_to_zero() -> ApiError:
    return ApiError(
        503,
        "no model replica is running (scaled to zero); this request asks the autoscaler for "
        f"one, retry in {RETRY_AFTER_UNAVAILABLE} s",
        code=SCALED_TO_ZERO_CODE,
        retry_after=RETRY_AFTER_UNAVAILABLE,
    )


_ERROR_TYPES = {
    429: "rate_limit_error",
    503: "service_unavailable_error",
    500: "internal_error",
}


def error_response(error: ApiError) -> JSONResponse:
    body = ErrorBody(
        message=str(error),
        type=_ERROR_TYPES.get(error.status, "invalid_request_error"),
        param=error.param,
        code=error.code,
    )
    headers = {"Retry-After": str(error.retry_after)} if error.retry_after is not None else None
    return JSONResponse(
        ErrorResponse(error=body).model_dump(), status_code=error.status, headers=headers
    )


class BodyBudget:
    """The request-body bytes this ingress replica holds at once, bounded by
    `serving.maxRequestBytesInFlight`: many large uploads at a time cannot exhaust its memory."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_flight = 0

    def take(self, size: int) -> bool:
        """Hold `size` more bytes if the budget has room; False (nothing held) if not."""
        if self.in_flight + size > self.limit:
            return False
        self.in_flight += size
        return True

    def give_back(self, size: int) -> None:
        self.in_flight -= size


class BodyLimit:
    """Reads a request body up to the app's `max_request_bytes` (413 beyond it, at once when
    Content-Length says so) with a timeout per part (408), then hands it to the app whole.

    The body's bytes are held in the app's `body_budget` from Content-Length (or, chunked, as they
    arrive) until the response starts or the request ends however it ends; a body the budget has
    no room for is refused with 503 before more of it is read."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        state = scope["app"].state
        limit = state.max_request_bytes
        budget: BodyBudget = state.body_budget
        too_large = ApiError(
            413,
            f"the request body exceeds {limit} bytes (serving.maxRequestBytes)",
            code="request_too_large",
        )
        busy = ApiError(
            503,
            f"the server holds its limit of {budget.limit} request-body bytes in flight "
            "(serving.maxRequestBytesInFlight); retry later",
            code="request_bytes_in_flight_exceeded",
            retry_after=1,
        )

        async def refuse(error: ApiError) -> None:
            _count_route(state, scope["path"], error.status)
            await error_response(error)(scope, receive, send)

        declared = dict(scope["headers"]).get(b"content-length")
        declared_size = int(declared) if declared is not None and declared.isdigit() else None
        if declared_size is not None and declared_size > limit:
            await refuse(too_large)
            return
        held = 0
        try:
            if declared_size is not None:
                if not budget.take(declared_size):
                    await refuse(busy)
                    return
                held = declared_size
            chunks: list[bytes] = []
            size = 0
            while True:
                try:
                    message = await asyncio.wait_for(receive(), BODY_TIMEOUT_SECONDS)
                except TimeoutError:
                    timeout = ApiError(408, "the request body was not sent in time", code="timeout")
                    await refuse(timeout)
                    return
                if message["type"] == "http.disconnect":
                    return
                part = message.get("body", b"")
                size += len(part)
                if size > limit:
                    await refuse(too_large)
                    return
                if size > held:
                    if not budget.take(size - held):
                        await refuse(busy)
                        return
                    held = size
                chunks.append(part)
                if not message.get("more_body", False):
                    break
            body = b"".join(chunks)
            sent = False

            async def replay() -> Message:
                nonlocal sent
                if not sent:
                    sent = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            async def send_releasing(message: Message) -> None:
                # The body has been parsed and answered: a stream does not hold it while it runs.
                nonlocal held
                if message["type"] == "http.response.start":
                    budget.give_back(held)
                    held = 0
                await send(message)

            await self.app(scope, replay, send_releasing)
        finally:
            budget.give_back(held)


class _Pass:
    """A request that the closed gate let through: settled once the scheduler admitted or
    refused it. AdmissionGateCheck puts it in the request's scope under `_PASS`."""

    settled = False


_PASS = "grokserve.admission_pass"


class AdmissionGateCheck:
    """Answers a generation request with the scheduler's last "full" while the app's
    `admission_gate` is closed, before its body is read, parsed or tokenized. It also talks with
    the gate in Serve's proxy: tells it the capacity on every response, and counts the refusals it
    reports."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = scope["app"].state
        # Only with the proxy's gate in front (see proxy_gate_installed).
        notice: CapacityNotice | None = getattr(state, "capacity_notice", None)
        if notice is not None:
            _count_proxy_refusals(state, scope)
            send = notice.telling(send, scope.get("root_path", ""))
        if (
            scope["method"] != "POST"
            # Under a route prefix, Serve puts the prefix in both root_path and path.
            or scope["path"].removeprefix(scope.get("root_path", "")) not in GENERATION_ROUTES
        ):
            await self.app(scope, receive, send)
            return
        watch: ReplicaWatch | None = getattr(state, "replica_watch", None)
        # Before the body is read: no replica would take it.
        if watch is not None and (at_zero := watch.refuse_at_zero()) is not None:
            _count_route(state, scope["path"], 503)
            await error_response(at_zero)(scope, receive, send)
            return
        gate: AdmissionGate = state.admission_gate
        takes_pass, refusal = gate.check()
        if refusal is not None:
            _count_route(state, scope["path"], 429)
            error = ApiError(
                429,
                refusal.message,
                code=refusal.code,
                retry_after=refusal.retry_after,
            )
            await error_response(error)(scope, receive, send)
            return
        if not takes_pass:
            await self.app(scope, receive, send)
            return
        held = scope[_PASS] = _Pass()
        try:
            await self.app(scope, receive, send)
        finally:
            if not held.settled:
                gate.give_back()


class CapacityNotice:
    """What the ingress tells Serve's proxy on every response (CAPACITY_HEADER, see
    `grokserve.serving.proxy_gate`): how many requests the running replicas hold at most, and the
    429 to answer beyond that. `follow_replicas` keeps the replica count (autoscaling changes it)."""

    def __init__(self, config: ServingConfig) -> None:
        limits = config.serving
        self.per_replica = limits.max_batch_size + limits.max_queued_requests
        # Never 0: at zero replicas the proxy must let requests reach the ingress, which answers
        # them (503 scaled_to_zero) and counts them as the demand that wakes the deployment.
        self.replicas = max(config.replicas, 1)
        message = queue_full_message(limits.max_queued_requests)
        refusal = ApiError(429, message, code=QUEUE_FULL_CODE, retry_after=1)
        self._refusal = {
            "retryAfter": refusal.retry_after,
            "body": bytes(error_response(refusal).body).decode(),
        }
        self._headers: dict[tuple[str, int], bytes] = {}

    def header(self, prefix: str) -> bytes:
        key = (prefix, self.replicas)
        if key not in self._headers:
            capacity = self.replicas * self.per_replica
            told = {"prefix": prefix, "capacity": capacity, **self._refusal}
            self._headers[key] = json.dumps(told, separators=(",", ":")).encode()
        return self._headers[key]

    def telling(self, send: Send, prefix: str) -> Send:
        async def send_telling(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [*message.get("headers", ()), (_CAPACITY, self.header(prefix))]
                message = {**message, "headers": headers}
            await send(message)

        return send_telling


class ReplicaWatch:
    """The model deployment of Serve application `app_name` as Serve's controller reports it,
    read every REPLICA_COUNT_SECONDS in a thread (inside the Serve cluster only: elsewhere
    serve.status() starts Ray): the running replicas for the capacity notice, and whether it is
    scaled to zero (healthy with no replica in any state: none runs, none starts)."""

    def __init__(
        self, config: ServingConfig, app_name: str, capacity_notice: CapacityNotice | None
    ) -> None:
        self.scaled_to_zero = config.replicas == 0
        self.demand = ZeroDemand(
            config.name,
            f"ingress:{serve.get_replica_context().replica_tag}",
            retry_after_seconds=RETRY_AFTER_UNAVAILABLE,
            window_seconds=ZERO_DEMAND_WINDOW_SECONDS,
        )
        self._app_name = app_name
        self._capacity_notice = capacity_notice
        threading.Thread(target=self._follow, daemon=True).start()

    def refuse_at_zero(self) -> ApiError | None:
        """At zero replicas a call to the model deployment would wait for one: the 503 to answer
        at once, the request counted as the demand that wakes the deployment; else None."""
        if not self.scaled_to_zero:
            return None
        self.demand.refused()
        return scaled_to_zero()

    def _follow(self) -> None:
        while True:
            time.sleep(REPLICA_COUNT_SECONDS)
            try:
                application = serve.status().applications.get(self._app_name)
                deployment = application and application.deployments.get(REPLICA_DEPLOYMENT)
            except Exception:
                log.warning("reading the replica count failed; retrying", exc_info=True)
                continue
            if not deployment:
                continue
            states = deployment.replica_states
            self.scaled_to_zero = deployment.status == DeploymentStatus.HEALTHY and not any(
                states.values()
            )
            running = states.get(ReplicaState.RUNNING, 0)
            # None running (being replaced): requests go on to get their 503.
            if running and self._capacity_notice is not None:
                self._capacity_notice.replicas = running


def _count_proxy_refusals(state: State, scope: Scope) -> None:
    """Count the 429s that Serve's proxy answered itself (see `grokserve.serving.proxy_gate`)."""
    report = dict(scope["headers"]).get(REFUSALS_HEADER.encode())
    metrics = getattr(state, "request_metrics", None)
    if not report or metrics is None:
        return
    for item in report.decode().split(","):
        route, _, count = item.partition("=")
        if route in GENERATION_ROUTES and count.isdigit():
            metrics.on_response(route, 429, int(count))


app = FastAPI(title="grokserve", description="OpenAI-compatible API for Grok models")
app.add_middleware(BodyLimit)
# Added last, so it runs first: a refusal does not wait for the body.
app.add_middleware(AdmissionGateCheck)
_DEFAULT_LIMITS = ServingConfig().serving
app.state.max_request_bytes = _DEFAULT_LIMITS.max_request_bytes
app.state.body_budget = BodyBudget(_DEFAULT_LIMITS.max_request_bytes_in_flight)
app.state.admission_gate = AdmissionGate()


@app.exception_handler(ApiError)
async def _api_error(request: Request, error: ApiError) -> JSONResponse:
    _count(request, error.status)
    return error_response(error)


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    _count(request, 400)
    first = error.errors()[0]
    # loc is (where, field, ...), where is body, query or path.
    location = [str(part) for part in first.get("loc", ())[1:]]
    cause = first.get("ctx", {}).get("error")
    if first.get("type") == "json_invalid":
        return error_response(
            ApiError(
                400, f"invalid JSON body: {first.get('ctx', {}).get('error')}", code="invalid_json"
            )
        )
    if isinstance(cause, InvalidUnicode):
        return error_response(ApiError(400, str(cause), param=cause.param, code="invalid_unicode"))
    if isinstance(cause, UnsupportedParameter):
        return error_response(
            ApiError(400, str(cause), param=cause.param, code="unsupported_parameter")
        )
    if not location and isinstance(cause, ValueError):
        # A check across fields: its message starts with the parameter it names.
        message = str(cause)
        param = message.split(":", 1)[0]
        return error_response(ApiError(400, message, param=param, code="invalid_value"))
    if not location:
        return error_response(
            ApiError(400, "the request body must be a JSON object", code="invalid_json")
        )
    param = ".".join(location)
    code = "missing_required_parameter" if first.get("type") == "missing" else "invalid_value"
    return error_response(ApiError(400, f"{param}: {first.get('msg')}", param=param, code=code))


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
    _count(request, error.status_code)
    codes = {404: "not_found", 405: "method_not_allowed"}
    status = error.status_code
    return error_response(ApiError(status, str(error.detail), code=codes.get(status)))


@app.exception_handler(Exception)
async def _internal_error(request: Request, error: Exception) -> JSONResponse:
    # The client learns that it failed, never how: internals stay in the log.
    log.exception("unhandled error on %s", request.url.path)
    _count(request, 500)
    return error_response(ApiError(500, "internal server error; see the server's logs"))


def _count(request: Request, status: int | str) -> None:
    _count_route(request.app.state, request.url.path, status)


def _count_route(state: State, path: str, status: int | str) -> None:
    metrics = getattr(state, "request_metrics", None)
    if metrics is not None and path in GENERATION_ROUTES:
        metrics.on_response(path, status)


def _sse(payload: dict[str, Any] | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n"


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


_REPLICA_FAILED = {"deltas": [{"index": 0, "finish_reason": "error", "completion_tokens": 0}]}


async def _guard(
    messages: AsyncIterator[tuple[int, dict[str, Any]]],
) -> AsyncIterator[tuple[int, dict[str, Any]]]:
    """The messages, ending with an error delta (not an exception) if the replica dies."""
    try:
        async for item in messages:
            yield item
    except RayError as error:
        log.warning("a replica failed while streaming: %r", error)
        yield 0, _REPLICA_FAILED


async def _merge(
    streams: list[DeploymentResponseGenerator],
) -> AsyncIterator[tuple[int, dict[str, Any]]]:
    """The messages of several streams as they arrive, each with its stream's position."""
    if len(streams) == 1:
        async for message in streams[0]:
            yield 0, message
        return
    queue: asyncio.Queue[tuple[int, dict[str, Any] | None]] = asyncio.Queue()

    async def pump(position: int, stream: DeploymentResponseGenerator) -> None:
        try:
            async for message in stream:
                await queue.put((position, message))
        finally:
            await queue.put((position, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        open_streams = len(streams)
        while open_streams:
            position, message = await queue.get()
            if message is None:
                open_streams -= 1
            else:
                yield position, message
        for task in tasks:
            task.result()  # a stream that failed fails the response
    finally:
        for task in tasks:
            task.cancel()


class _Started:
    """One prompt's admitted generation: its event stream and what the first event said."""

    def __init__(self, stream: DeploymentResponseGenerator, first: dict[str, Any]) -> None:
        self.stream = stream
        self.prompt_tokens: int = first["prompt_tokens"]
        self.prompt_text: str | None = first["prompt_text"]


class _Choice:
    """What one choice accumulates from its deltas."""

    def __init__(self) -> None:
        self.text = ""
        self.tokens = 0
        self.reason: str | None = None
        self.logprobs: list[dict[str, Any]] = []
        self.prompt_logprobs: list[dict[str, Any]] | None = None

    def add(self, event: dict[str, Any]) -> None:
        self.text += event["text"]
        self.tokens = event["completion_tokens"]
        self.reason = event["finish_reason"]
        self.logprobs += event["logprobs"]
        if event["prompt_logprobs"] is not None:
            self.prompt_logprobs = event["prompt_logprobs"]

    @property
    def cumulative_logprob(self) -> float:
        return sum(entry["logprob"] for entry in self.logprobs)


@serve.ingress(app)
class OpenAIIngress:
    def __init__(
        self, replica: DeploymentHandle, metrics_hub: DeploymentHandle, args: dict[str, Any]
    ) -> None:
        self.config = ServingConfig.from_args(args)
        self.replica = replica
        # One streaming handle for every request (options() builds a new handle each call).
        self.replica_stream = replica.options(stream=True)
        self.metrics_hub = metrics_hub
        self.created = int(time.time())
        body_budget = BodyBudget(self.config.serving.max_request_bytes_in_flight)
        self.request_metrics = RequestMetrics(self.config.name, lambda: body_budget.in_flight)
        app.state.max_request_bytes = self.config.serving.max_request_bytes
        app.state.body_budget = body_budget
        app.state.request_metrics = self.request_metrics
        self.admission_gate = AdmissionGate()
        app.state.admission_gate = self.admission_gate
        capacity_notice = CapacityNotice(self.config) if proxy_gate_installed() else None
        if capacity_notice is not None:
            app.state.capacity_notice = capacity_notice
        self.replica_watch = ReplicaWatch(
            self.config, serve.get_replica_context().app_name, capacity_notice
        )
        app.state.replica_watch = self.replica_watch

    # -- plain routes ---------------------------------------------------------------------------

    @app.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz(self) -> dict[str, Any]:
        if self.replica_watch.scaled_to_zero:
            # Not demand: probes are no clients.
            raise scaled_to_zero()
        try:
            replica = await asyncio.wait_for(
                self.replica.ready.remote(), timeout=READY_TIMEOUT_SECONDS
            )
        except Exception as error:
            log.info("readiness check failed: %r", error)
            raise unavailable("no model replica is ready to serve") from error
        return {"status": "ready", "model": self.config.name, **replica}

    def _card(self) -> ModelCard:
        return ModelCard(id=self.config.name, created=self.created)

    @app.get("/v1/models")
    async def models(self) -> ModelList:
        return ModelList(data=[self._card()])

    @app.get("/v1/models/{model_id:path}")
    async def model(self, model_id: str) -> ModelCard:
        self._check_model(model_id)
        return self._card()

    @app.get("/v1/placement")
    async def placement(self) -> dict[str, Any]:
        return await self._call("placement")

    @app.get("/metrics")
    async def metrics(self) -> Response:
        text = await self.metrics_hub.render.remote(self.replica_watch.demand.snapshot())
        return Response(
            content=text + self.request_metrics.render(), media_type=CONTENT_TYPE_LATEST
        )

    # -- vLLM's tokenizer routes ---------------------------------------------------------------

    @app.post("/tokenize")
    async def tokenize(self, body: TokenizeRequest) -> dict[str, Any]:
        if body.model is not None:
            self._check_model(body.model)
        text = body.prompt if body.messages is None else render_chat(body.messages)
        answer = await self._call("tokenize", text, body.add_special_tokens)
        return {**answer, "max_model_len": self.config.serving.max_sequence_length}

    @app.post("/detokenize")
    async def detokenize(self, body: DetokenizeRequest) -> dict[str, Any]:
        if body.model is not None:
            self._check_model(body.model)
        return await self._call("detokenize", body.tokens)

    @app.get("/tokenizer_info")
    async def tokenizer_info(self) -> dict[str, Any]:
        info = await self._call("tokenizer_info")
        limit = self.config.serving.max_sequence_length
        return {**info, "model_max_length": limit, "chat_template": CHAT_TEMPLATE}

    async def _call(self, method: str, *args: Any) -> Any:
        """A replica method's result, or 503 when no replica can answer; its refusals as 400s."""
        if (at_zero := self.replica_watch.refuse_at_zero()) is not None:
            raise at_zero
        response = getattr(self.replica, method).remote(*args)
        try:
            answer = await asyncio.wait_for(response, ADMISSION_TIMEOUT_SECONDS)
        except (RayError, TimeoutError) as error:
            log.warning("replica call failed: %r", error)
            raise unavailable("no model replica could answer; retry later") from error
        if isinstance(answer, dict) and "error" in answer:
            refusal = answer["error"]
            raise ApiError(400, refusal["message"], param=refusal["param"], code="invalid_value")
        return answer

    # -- generation -----------------------------------------------------------------------------

    @app.post("/v1/completions")
    async def completions(self, body: CompletionRequest, http: Request) -> Response:
        self._check_model(body.model)
        best_of = body.best_of or body.n
        # best_of ranks choices by their logprobs: ask for them, show them only when asked.
        logprobs = body.logprobs if body.logprobs is not None or best_of == body.n else 0
        sampling = body.sampling_params(
            logprobs, prompt_logprobs=body.echo and logprobs is not None
        )
        requests = [
            GenerateRequest(
                prompt, body.max_tokens, sampling, body.stop_strings(), best_of, body.echo
            )
            for prompt in body.prompts()
        ]
        return await self._respond(body, requests, "text_completion", "cmpl", http)

    @app.post("/v1/chat/completions")
    async def chat_completions(self, body: ChatCompletionRequest, http: Request) -> Response:
        self._check_model(body.model)
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        request = GenerateRequest(
            render_chat(body.messages),
            body.effective_max_tokens(),
            body.sampling_params(logprobs, prompt_logprobs=False),
            [*body.stop_strings(), CHAT_STOP],
            body.n,
        )
        return await self._respond(body, [request], "chat.completion", "chatcmpl", http)

    def _check_model(self, model: str) -> None:
        if model != self.config.name:
            raise ApiError(
                404,
                f"The model `{model}` does not exist; this server serves "
                f"`{self.config.name}` (see GET /v1/models)",
                param="model",
                code="model_not_found",
            )

    async def _start(self, request: GenerateRequest, held: _Pass | None) -> _Started:
        """Send the request to a replica; return its event stream once it was admitted. `held`:
        the gate's pass the HTTP request holds, if any."""
        # Ray types remote() as either response kind; a stream=True handle always gives a generator.
        stream = cast(DeploymentResponseGenerator, self.replica_stream.generate.remote(request))
        try:
            first = await asyncio.wait_for(stream.__anext__(), ADMISSION_TIMEOUT_SECONDS)
        except BackPressureError as error:
            raise ApiError(
                429,
                "all model replicas are at capacity; retry later",
                code="rate_limit_exceeded",
                retry_after=1,
            ) from error
        except (RayError, TimeoutError) as error:
            stream.cancel()
            log.warning("no replica admitted the request: %r", error)
            raise unavailable("no model replica is serving now; retry later") from error
        if "error" in first:
            refusal = first["error"]
            if refusal["any_request"]:
                self.admission_gate.refused(
                    Refusal(refusal["message"], refusal["code"], refusal["retry_after"])
                )
                if held is not None:
                    held.settled = True
            raise ApiError(
                refusal["status"],
                refusal["message"],
                param=refusal["param"],
                code=refusal["code"],
                retry_after=refusal["retry_after"],
            )
        self.admission_gate.admitted()
        if held is not None:
            held.settled = True
        return _Started(stream, first)

    async def _start_all(
        self, requests: list[GenerateRequest], held: _Pass | None
    ) -> list[_Started]:
        """All prompts admitted, or none: the first refusal cancels the others."""
        results = await asyncio.gather(
            *(self._start(r, held) for r in requests), return_exceptions=True
        )
        failures = [r for r in results if isinstance(r, BaseException)]
        if failures:
            self._release([r for r in results if isinstance(r, _Started)])
            raise failures[0]
        return results  # type: ignore[return-value]

    def _release(self, started: list[_Started]) -> None:
        """Admitted requests that are done (however they ended): their slots are free."""
        for s in started:
            s.stream.cancel()
            self.admission_gate.finished()

    async def _respond(
        self,
        body: SamplingFields,
        requests: list[GenerateRequest],
        kind: str,
        prefix: str,
        http: Request,
    ) -> Response:
        started = await self._start_all(requests, http.scope.get(_PASS))
        header = {"id": new_id(prefix), "object": kind, "created": now(), "model": body.model}
        route = GENERATION_ROUTES[kind == "chat.completion"]
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            chunks = self._stream(started, requests[0].n, header, include_usage, body, route)
            return StreamingResponse(chunks, media_type="text/event-stream")
        per_prompt = requests[0].n
        choices = [_Choice() for _ in range(len(started) * per_prompt)]
        try:
            async for position, message in _merge([s.stream for s in started]):
                for event in message["deltas"]:
                    choices[position * per_prompt + event["index"]].add(event)
        except RayError as error:
            log.warning("a replica failed while generating: %r", error)
            raise unavailable("the model replica failed while generating; retry later") from error
        finally:
            self._release(started)
        if any(choice.reason == "error" for choice in choices):
            raise unavailable("the model replica failed while generating; retry later")
        rendered: list[dict[str, Any]] = []
        wanted = body.n
        for position, s in enumerate(started):
            group = choices[position * per_prompt : (position + 1) * per_prompt]
            if per_prompt > wanted:  # best_of
                group = sorted(group, key=lambda c: c.cumulative_logprob, reverse=True)[:wanted]
            for choice in group:
                rendered.append(self._render(body, s, choice, index=len(rendered)))
        completion_tokens = sum(choice.tokens for choice in choices)
        self.request_metrics.on_response(route, 200)
        return JSONResponse(
            {
                **header,
                "choices": rendered,
                "usage": _usage(sum(s.prompt_tokens for s in started), completion_tokens),
            }
        )

    def _render(
        self, body: SamplingFields, started: _Started, choice: _Choice, index: int
    ) -> dict[str, Any]:
        if isinstance(body, ChatCompletionRequest):
            logprobs = chat_logprobs(choice.logprobs) if body.logprobs else None
            return chat_choice(index, choice.text, choice.reason, logprobs)
        assert isinstance(body, CompletionRequest)
        text, logprobs = choice.text, None
        echoed = started.prompt_text or ""
        if body.echo:
            text = echoed + text
        if body.logprobs is not None:
            entries = [*(choice.prompt_logprobs or []), *choice.logprobs]
            logprobs = completion_logprobs(entries, 0 if body.echo else len(echoed))
        return completion_choice(index, text, choice.reason, logprobs)

    async def _stream(
        self,
        started: list[_Started],
        per_prompt: int,
        header: dict[str, Any],
        include_usage: bool,
        body: SamplingFields,
        route: str,
    ) -> AsyncIterator[str]:
        chat = header["object"] == "chat.completion"
        chunk_header = {**header, "object": "chat.completion.chunk" if chat else "text_completion"}
        first_seen: set[int] = set()
        tokens: dict[int, int] = {}
        offsets: dict[int, int] = {}
        failed = False
        finished = False
        try:
            async for position, message in _guard(_merge([s.stream for s in started])):
                chunks = []
                for event in message["deltas"]:
                    index = position * per_prompt + event["index"]
                    reason = event["finish_reason"]
                    tokens[index] = event["completion_tokens"]
                    if reason == "error":
                        error = {"message": "the model replica failed while generating; retry"}
                        chunks.append(_sse({"error": {**error, "code": "service_unavailable"}}))
                        failed = True
                        break
                    text = event["text"]
                    first = index not in first_seen
                    first_seen.add(index)
                    if chat:
                        logprobs = None
                        if isinstance(body, ChatCompletionRequest) and body.logprobs:
                            logprobs = chat_logprobs(event["logprobs"])
                        if not text and reason is None and not first and not event["logprobs"]:
                            continue
                        choice = chat_chunk_choice(
                            index, text, reason, first=first, logprobs=logprobs
                        )
                    else:
                        assert isinstance(body, CompletionRequest)
                        entries = event["logprobs"]
                        if first and body.echo:
                            text = (started[position].prompt_text or "") + text
                            entries = [*(event["prompt_logprobs"] or []), *entries]
                        if not text and reason is None and not entries:
                            continue
                        logprobs = None
                        if body.logprobs is not None:
                            offset = offsets.get(index, 0)
                            logprobs = completion_logprobs(entries, offset)
                            offsets[index] = offset + sum(len(e["text"]) for e in entries)
                        choice = completion_choice(index, text, reason, logprobs)
                    chunks.append(_sse({**chunk_header, "choices": [choice]}))
                # One write for everything that was ready: fewer messages through Serve's proxy.
                if chunks:
                    yield "".join(chunks)
                if failed:
                    break
            if include_usage and not failed:
                prompt_tokens = sum(s.prompt_tokens for s in started)
                usage = _usage(prompt_tokens, sum(tokens.values()))
                yield _sse({**chunk_header, "choices": [], "usage": usage})
            yield _sse("[DONE]")
            finished = True
        finally:
            # Runs when the client disconnects mid-stream too: the replica frees the slots.
            self._release(started)
            status = 503 if failed else 200 if finished else "cancelled"
            self.request_metrics.on_response(route, status)
