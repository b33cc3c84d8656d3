"""Serving throughput: HTTP vs in-process, and continuous batching vs one request at a time.

    python bench/serve.py [--preset grok-mini] [--clients 16] [--max-tokens 64]

Runs of the same `--clients` greedy requests (up to max_tokens each; tokens are counted as generated):
  1. HTTP: a local Ray Serve deployment (G = 1 shard worker), `--clients` concurrent streaming
     clients (SSE), once per `--stream-intervals` value (serving.streamIntervalSeconds);
  2. in-process, concurrent: the same scheduler + model in this process, all requests at once;
  3. in-process, sequential: one request at a time (no batching).
  4. HTTP burst: 10× what the replica admits (maxBatchSize running + maxQueuedRequests waiting)
     sent at once, non-streaming; and the same burst against a bare uvicorn server that answers
     429 at once (the floor: what the client and TCP cost on this machine).
Prints generated tokens/s of each and the ratios HTTP / in-process (target ≥ 0.9) and
batched / sequential (target ≥ 4 at 16 clients); for the burst, the admitted requests' tokens/s
and the median and p99 time to a 429 (target: well under a second), next to the floor's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import socket
import time

import httpx
import torch
import uvicorn
from starlette.types import Receive, Scope, Send

from grokserve.serving.config import ServingConfig
from grokserve.serving.engine import Engine
from grokserve.serving.executor import LocalExecutor, ModelStepper
from grokserve.serving.launcher import LocalServing
from grokserve.serving.loading import build_engine, load_shard
from grokserve.serving.requests import GenerateRequest


def prompts(count: int) -> list[str]:
    return [f"Benchmark request {i}: the quick brown fox" for i in range(count)]


async def http_run(url: str, name: str, texts: list[str], max_tokens: int) -> tuple[int, float]:
    async def one(http: httpx.AsyncClient, prompt: str) -> int:
        body = {
            "model": name,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        tokens = 0
        async with http.stream("POST", "/v1/completions", json=body) as response:
            response.raise_for_status()
            async for line in response.aiter_lines():
                if line.startswith("data: {"):
                    usage = json.loads(line[6:]).get("usage")
                    tokens = usage["completion_tokens"] if usage else tokens
        return tokens

    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        await one(http, "warm-up")
        start = time.perf_counter()
        counts = await asyncio.gather(*(one(http, p) for p in texts))
        return sum(counts), time.perf_counter() - start


async def burst_run(
    url: str, name: str, count: int, max_tokens: int
) -> tuple[int, float, list[float]]:
    """`count` requests at once: admitted tokens, the burst's wall time, each 429's seconds."""

    async def one(http: httpx.AsyncClient, index: int) -> tuple[int, int, float]:
        body = {"model": name, "prompt": f"burst {index}", "max_tokens": max_tokens}
        started = time.perf_counter()
        response = await http.post("/v1/completions", json={**body, "temperature": 0})
        seconds = time.perf_counter() - started
        tokens = response.json()["usage"]["completion_tokens"] if response.is_success else 0
        return response.status_code, tokens, seconds

    limits = httpx.Limits(max_connections=count + 8)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        start = time.perf_counter()
        results = await asyncio.gather(*(one(http, i) for i in range(count)))
        wall = time.perf_counter() - start
    unexpected = {status for status, _, _ in results} - {200, 429}
    if unexpected:
        raise RuntimeError(f"the burst got statuses other than 200 and 429: {unexpected}")
    refusals = sorted(seconds for status, _, seconds in results if status == 429)
    return sum(tokens for _, tokens, _ in results), wall, refusals


async def _refuse_at_once(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "http":
        headers = [(b"retry-after", b"1"), (b"content-length", b"2")]
        await send({"type": "http.response.start", "status": 429, "headers": headers})
        await send({"type": "http.response.body", "body": b"{}"})


def _serve_refusals(port: int) -> None:
    uvicorn.run(_refuse_at_once, host="127.0.0.1", port=port, log_level="error")


def floor_run(count: int) -> list[float]:
    """The burst against a bare uvicorn server answering 429 at once (in its own process, as
    Serve's proxy is): each 429's seconds."""
    port = free_port()
    server = multiprocessing.get_context("spawn").Process(target=_serve_refusals, args=(port,))
    server.start()
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        return asyncio.run(burst_run(f"http://127.0.0.1:{port}", "floor", count, 1))[2]
    finally:
        server.terminate()
        server.join()


def in_process_engine(config: ServingConfig) -> Engine:
    model = load_shard(config, rank=0, master=("127.0.0.1", 0))
    return build_engine(config, LocalExecutor(ModelStepper.for_config(model, config)))


async def engine_run(
    engine: Engine, texts: list[str], max_tokens: int, concurrent: bool
) -> tuple[int, float]:
    async def one(prompt: str) -> int:
        request = GenerateRequest(prompt, max_tokens, {"temperature": 0})
        tokens = 0
        async for event in engine.generate(request):
            for delta in event.get("deltas", ()):
                tokens = delta["completion_tokens"]
        return tokens

    engine.scheduler.start()
    try:
        await one("warm-up")
        start = time.perf_counter()
        if concurrent:
            counts = await asyncio.gather(*(one(p) for p in texts))
        else:
            counts = [await one(p) for p in texts]
        return sum(counts), time.perf_counter() - start
    finally:
        await engine.scheduler.stop()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="grok-mini")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument(
        "--stream-intervals",
        default="0,0.05",
        help="comma-separated serving.streamIntervalSeconds values for the HTTP runs",
    )
    args = parser.parse_args()
    intervals = [float(v) for v in args.stream_intervals.split(",")]
    config = ServingConfig(
        name=args.preset,
        model={"preset": args.preset},
        serving={
            "maxBatchSize": args.clients,
            "maxSequenceLength": 256,
            "maxQueuedRequests": args.clients,
        },
    )
    texts = prompts(args.clients)
    torch.set_num_threads(max(1, int(config.resources.cpus_per_shard)))

    engine = in_process_engine(config)
    sequential = asyncio.run(engine_run(engine, texts, args.max_tokens, concurrent=False))
    batched = asyncio.run(engine_run(engine, texts, args.max_tokens, concurrent=True))
    over_http = {}
    local = LocalServing(config, port=free_port()).start_ray_and_serve()
    try:
        for index, interval in enumerate(intervals):
            variant = config.model_copy(
                update={
                    "serving": config.serving.model_copy(
                        update={"stream_interval_seconds": interval}
                    )
                }
            )
            url = local.deploy(variant, f"bench{index}", f"/bench{index}")
            over_http[interval] = asyncio.run(http_run(url, config.name, texts, args.max_tokens))
            if index == 0:
                admits = config.serving.max_batch_size + config.serving.max_queued_requests
                burst = asyncio.run(burst_run(url, config.name, 10 * admits, args.max_tokens))
            local.delete(f"bench{index}")
    finally:
        local.close()
    floor = floor_run(10 * admits)

    def rate(run: tuple[int, float]) -> float:
        return run[0] / run[1]

    in_process = rate(batched)
    print(f"{args.clients} clients × {args.max_tokens} tokens, {args.preset}, greedy")
    for interval, run in over_http.items():
        label = f"HTTP (SSE), stream interval {interval:g} s"
        print(
            f"  {label:38s}: {rate(run):8.1f} tokens/s  ({rate(run) / in_process:.2f} of in-process)"
        )
    print(f"  {'in-process engine, concurrent':38s}: {in_process:8.1f} tokens/s")
    print(f"  {'in-process engine, sequential':38s}: {rate(sequential):8.1f} tokens/s")
    print(f"  {'continuous batching / sequential':38s}: {in_process / rate(sequential):8.2f}")
    tokens, wall, refusals = burst
    print(f"10× burst ({10 * admits} requests at once, non-streaming)")
    print(f"  {'admitted tokens/s':38s}: {tokens / wall:8.1f}")

    def median_p99(seconds: list[float]) -> str:
        p99 = seconds[min(len(seconds) - 1, int(0.99 * len(seconds)))]
        return f"{seconds[len(seconds) // 2]:8.3f} / {p99:.3f} s"

    if refusals:
        print(f"  {'429s':38s}: {len(refusals):8d}")
        print(f"  {'time to 429, median / p99':38s}: {median_p99(refusals)}")
    print(f"  {'floor (bare server), median / p99':38s}: {median_p99(floor)}")


if __name__ == "__main__":
    main()
