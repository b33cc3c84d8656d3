"""The OpenAI API over real HTTP on a real Ray Serve deployment, driven by the official client."""

import asyncio
import json

import httpx
import openai
import pytest

from testkit.serving import MODEL

pytestmark = pytest.mark.slow
PROMPTS = [f"Request {i}: {'lorem ipsum ' * (i % 3)}dolor" for i in range(16)]


@pytest.fixture(scope="module")
def client(base_url):
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=60)


def test_completion_and_chat_with_the_openai_client(client):
    completion = client.completions.create(model=MODEL, prompt="Hello", max_tokens=8, temperature=0)
    assert completion.choices[0].finish_reason in ("length", "stop")
    assert completion.usage.prompt_tokens == len(b"Hello")
    assert 1 <= completion.usage.completion_tokens <= 8

    streamed = client.completions.create(
        model=MODEL, prompt="Hello", max_tokens=8, temperature=0, stream=True
    )
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks) == completion.choices[0].text
    assert chunks[-1].choices[0].finish_reason == completion.choices[0].finish_reason

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    chat = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=6, temperature=0, n=2
    )
    assert [c.index for c in chat.choices] == [0, 1]
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content == chat.choices[1].message.content  # greedy
    stream = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=6,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == chat.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == chat.usage.completion_tokens // 2


def test_models_health_and_placement(base_url):
    with httpx.Client(base_url=base_url, timeout=30) as http:
        assert http.get("/healthz").json() == {"status": "ok"}
        assert http.get("/readyz").json()["status"] == "ready"
        assert [m["id"] for m in http.get("/v1/models").json()["data"]] == [MODEL]
        placement = http.get("/v1/placement").json()
        assert placement["strategy"] == "pack" and len(placement["shards"]) == 1


def test_sse_ends_with_done(base_url):
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 4, "stream": True}
    with httpx.stream("POST", f"{base_url}/v1/completions", json=body, timeout=30) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    assert all(e.startswith("data: ") for e in events)
    assert json.loads(events[0][6:])["object"] == "text_completion"


@pytest.mark.parametrize(
    ("body", "status", "param", "message"),
    [
        ({"model": "grok-9", "prompt": "x"}, 404, "model", "grok-9"),
        ({"model": MODEL, "prompt": "x", "max_tokens": 0}, 400, "max_tokens", "echo"),
        ({"model": MODEL, "prompt": "x", "max_tokens": -1}, 400, "max_tokens", "greater than"),
        ({"model": MODEL, "prompt": "x", "temperature": 3}, 400, "temperature", "less than"),
        ({"model": MODEL}, 400, "prompt", "required"),
        ({"model": MODEL, "prompt": "x" * 300}, 400, "prompt", "(maxSequenceLength)"),
        ({"model": MODEL, "prompt": [5] * 300}, 400, "prompt", "maxSequenceLength) is 128"),
        ({"model": MODEL, "prompt": "x", "max_tokens": 500}, 400, "max_tokens", "128"),
    ],
)
def test_errors_use_the_openai_shape_and_name_the_field(base_url, body, status, param, message):
    response = httpx.post(f"{base_url}/v1/completions", json=body, timeout=30)
    assert response.status_code == status
    error = response.json()["error"]
    assert error["param"] == param and message in error["message"]
    assert error["type"] == "invalid_request_error" and error["code"]


def test_invalid_json_is_a_400(base_url):
    response = httpx.post(
        f"{base_url}/v1/chat/completions",
        content=b'{"model": ',
        headers={"content-type": "application/json"},
        timeout=30,
    )
    assert response.status_code == 400
    assert "invalid JSON" in response.json()["error"]["message"]


async def _complete(http, prompt, max_tokens=24):
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    return await http.post("/v1/completions", json=body)


def _metric(text, name):
    """Sum of the samples of one metric name in a Prometheus exposition."""
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name + "{") or line.startswith(name + " ")
    )


def _bucket(text, name, le):
    """Sum of one histogram's cumulative bucket `le` over its series."""
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name + "_bucket{") and f'le="{le}"' in line
    )


async def test_16_concurrent_clients_match_sequential_greedy_with_batching(base_url):
    async with httpx.AsyncClient(base_url=base_url, timeout=120) as http:
        sequential = [(await _complete(http, p)).json() for p in PROMPTS]
        before = (await http.get("/metrics")).text
        concurrent = await asyncio.gather(*(_complete(http, p) for p in PROMPTS))
        await asyncio.sleep(2.5)  # replicas push metrics every second
        after = (await http.get("/metrics")).text
    assert [r.status_code for r in concurrent] == [200] * len(PROMPTS)
    texts = [r.json()["choices"][0]["text"] for r in concurrent]
    assert texts == [r["choices"][0]["text"] for r in sequential]

    # The scheduler is the only queue: all 16 reach it, 8 run at once and 8 wait for a slot,
    # so some decode step runs a full batch (however the requests' arrival was spread).
    def steps_over_4(text):
        return _metric(text, "grokserve_decode_batch_size_count") - _bucket(
            text, "grokserve_decode_batch_size", "4.0"
        )

    full_steps = steps_over_4(after) - steps_over_4(before)
    assert full_steps > 0, "no decode step ran more than 4 sequences: requests were not batched"
    routed = _metric(after, "grokserve_expert_tokens_total") - _metric(
        before, "grokserve_expert_tokens_total"
    )
    # grok-tiny: 2 layers, top-2 routing; every prompt and generated token is routed at least.
    generated = _metric(after, "grokserve_generation_tokens_total") - _metric(
        before, "grokserve_generation_tokens_total"
    )
    assert routed >= 2 * 2 * generated > 0
    assert 'layer="1"' in after and 'expert="7"' in after


async def test_client_disconnect_cancels_generation(base_url):
    body = {"model": MODEL, "prompt": "x", "max_tokens": 120, "temperature": 0, "stream": True}
    async with httpx.AsyncClient(base_url=base_url, timeout=60) as http:
        before = _metric((await http.get("/metrics")).text, "grokserve_generation_tokens_total")
        async with http.stream("POST", "/v1/completions", json=body) as response:
            async for _ in response.aiter_lines():
                break  # the first event arrived; hang up
        await asyncio.sleep(3)
        metrics = (await http.get("/metrics")).text
    generated = _metric(metrics, "grokserve_generation_tokens_total") - before
    assert generated < 120, "the replica kept generating after the client left"
    assert _metric(metrics, "grokserve_requests_running") == 0
