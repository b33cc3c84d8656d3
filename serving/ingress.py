"""The HTTP ingress: OpenAI-compatible routes, SSE streaming, errors in OpenAI's shape, /metrics."""

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator
from starlette.exceptions import HTTPException as StarletteHTTPException

from grokserve.serving.config import ServingConfig
from grokserve.serving.engine import GenerateRequest
from grokserve.serving.scheduler import SamplingParams
from grokserve.serving.schemas import (
    CHAT_STOP,
    ChatCompletionRequest,
    CompletionRequest,
    ErrorBody,
    ErrorResponse,
    ModelCard,
    ModelList,
    SamplingFields,
    chat_choice,
    chat_chunk_choice,
    completion_choice,
    new_id,
    now,
    render_chat,
)

READY_TIMEOUT_SECONDS = 5.0

app = FastAPI(title="grokserve", description="OpenAI-compatible API for Grok models")


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


_ERROR_TYPES = {429: "rate_limit_error", 503: "service_unavailable_error", 500: "internal_error"}


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


@app.exception_handler(ApiError)
async def _api_error(_: Request, error: ApiError) -> JSONResponse:
    return error_response(error)


@app.exception_handler(RequestValidationError)
async def _validation_error(_: Request, error: RequestValidationError) -> JSONResponse:
    first = error.errors()[0]
    # loc is (where, field, ...), where is body, query or path.
    location = [str(part) for part in first.get("loc", ())[1:]]
    if first.get("type") == "json_invalid":
        return error_response(
            ApiError(400, f"invalid JSON body: {first.get('ctx', {}).get('error')}")
        )
    if not location:
        return error_response(ApiError(400, "the request body must be a JSON object"))
    param = ".".join(location) or None
    message = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
    return error_response(ApiError(400, message, param=param))


@app.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, error: StarletteHTTPException) -> JSONResponse:
    return error_response(ApiError(error.status_code, str(error.detail)))


@app.exception_handler(Exception)
async def _internal_error(_: Request, error: Exception) -> JSONResponse:
    return error_response(ApiError(500, f"internal error: {error!r}"))


def _sse(payload: dict[str, Any] | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n"


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


@serve.ingress(app)
class OpenAIIngress:
    def __init__(
        self, replica: DeploymentHandle, metrics_hub: DeploymentHandle, args: dict[str, Any]
    ) -> None:
        self.config = ServingConfig.from_args(args)
        self.replica = replica
        self.metrics_hub = metrics_hub
        self.created = int(time.time())

    # -- plain routes ---------------------------------------------------------------------------

    @app.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz(self) -> dict[str, Any]:
        try:
            replica = await asyncio.wait_for(
                self.replica.ready.remote(), timeout=READY_TIMEOUT_SECONDS
            )
        except Exception as error:
            raise ApiError(503, f"no model replica answered: {error!r}") from error
        return {"status": "ready", "model": self.config.name, **replica}

    @app.get("/v1/models")
    async def models(self) -> ModelList:
        return ModelList(data=[ModelCard(id=self.config.name, created=self.created)])

    @app.get("/v1/placement")
    async def placement(self) -> dict[str, Any]:
        return await self.replica.placement.remote()

    @app.get("/metrics")
    async def metrics(self) -> Response:
        text = await self.metrics_hub.render.remote()
        return Response(content=text, media_type=CONTENT_TYPE_LATEST)

    # -- generation -----------------------------------------------------------------------------

    @app.post("/v1/completions")
    async def completions(self, body: CompletionRequest) -> Response:
        request = self._generate_request(body, body.prompt_input(), body.max_tokens, [])
        return await self._respond(body, request, "text_completion", "cmpl")

    @app.post("/v1/chat/completions")
    async def chat_completions(self, body: ChatCompletionRequest) -> Response:
        prompt = render_chat(body.messages)
        request = self._generate_request(body, prompt, body.effective_max_tokens(), [CHAT_STOP])
        return await self._respond(body, request, "chat.completion", "chatcmpl")

    def _generate_request(
        self,
        body: SamplingFields,
        prompt: str | list[int],
        max_tokens: int | None,
        extra_stop: list[str],
    ) -> GenerateRequest:
        if body.model != self.config.name:
            raise ApiError(
                404,
                f"The model `{body.model}` does not exist; this server serves "
                f"`{self.config.name}` (see GET /v1/models)",
                param="model",
                code="model_not_found",
            )
        sampling = SamplingParams(body.temperature, body.top_p, body.top_k, body.seed)
        stop = [*body.stop_strings(), *extra_stop]
        return GenerateRequest(prompt, max_tokens, sampling, stop, body.n)

    async def _start(self, request: GenerateRequest) -> tuple[DeploymentResponseGenerator, int]:
        """Send the request to a replica; return its event stream once it was admitted."""
        stream = self.replica.options(stream=True).generate.remote(request)
        try:
            first = await stream.__anext__()
        except BackPressureError as error:
            limits = self.config.serving
            raise ApiError(
                429,
                "all model replicas are at capacity (maxBatchSize running + "
                f"maxQueuedRequests={limits.max_queued_requests} queued each); retry later",
                code="rate_limit_exceeded",
                retry_after=1,
            ) from error
        if "error" in first:
            error = first["error"]
            raise ApiError(
                error["status"],
                error["message"],
                param=error["param"],
                code="rate_limit_exceeded" if error["status"] == 429 else None,
                retry_after=error["retry_after"],
            )
        return stream, first["prompt_tokens"]

    async def _respond(
        self, body: SamplingFields, request: GenerateRequest, kind: str, prefix: str
    ) -> Response:
        stream, prompt_tokens = await self._start(request)
        header = {"id": new_id(prefix), "object": kind, "created": now(), "model": body.model}
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            chunks = self._stream(stream, header, prompt_tokens, include_usage)
            return StreamingResponse(chunks, media_type="text/event-stream")
        try:
            texts = [""] * request.n
            reasons: list[str | None] = [None] * request.n
            tokens = [0] * request.n
            async for message in stream:
                for event in message["deltas"]:
                    index = event["index"]
                    texts[index] += event["text"]
                    tokens[index] = event["completion_tokens"]
                    reasons[index] = event["finish_reason"]
        finally:
            stream.cancel()
        if "error" in reasons:
            raise ApiError(500, "the model replica failed while generating; see its logs")
        choice: Callable[[int, str, str | None], dict[str, Any]] = (
            chat_choice if kind == "chat.completion" else completion_choice
        )
        return JSONResponse(
            {
                **header,
                "choices": [choice(i, texts[i], reasons[i]) for i in range(request.n)],
                "usage": _usage(prompt_tokens, sum(tokens)),
            }
        )

    async def _stream(
        self,
        stream: DeploymentResponseGenerator,
        header: dict[str, Any],
        prompt_tokens: int,
        include_usage: bool,
    ) -> AsyncIterator[str]:
        chat = header["object"] == "chat.completion"
        chunk_header = {**header, "object": "chat.completion.chunk" if chat else "text_completion"}
        started: set[int] = set()
        tokens: dict[int, int] = {}
        failed = False
        try:
            async for message in stream:
                chunks = []
                for event in message["deltas"]:
                    index, reason = event["index"], event["finish_reason"]
                    tokens[index] = event["completion_tokens"]
                    if reason == "error":
                        error = {"message": "the model replica failed while generating"}
                        chunks.append(_sse({"error": error}))
                        failed = True
                        break
                    if not event["text"] and reason is None:
                        continue
                    if chat:
                        choice = chat_chunk_choice(
                            index, event["text"], reason, first=index not in started
                        )
                        started.add(index)
                    else:
                        choice = completion_choice(index, event["text"], reason)
                    chunks.append(_sse({**chunk_header, "choices": [choice]}))
                # One write for everything that was ready: fewer messages through Serve's proxy.
                if chunks:
                    yield "".join(chunks)
                if failed:
                    break
            if include_usage and not failed:
                usage = _usage(prompt_tokens, sum(tokens.values()))
                yield _sse({**chunk_header, "choices": [], "usage": usage})
            yield _sse("[DONE]")
        finally:
            # Runs when the client disconnects mid-stream too: the replica frees the slots.
            stream.cancel()
