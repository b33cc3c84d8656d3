"""The OpenAI API as clients use it, over HTTP on the shared deployment: prompt lists, logprobs,
echo scoring, sampling controls, refused parameters, bounded input, vLLM's tokenizer routes."""

import asyncio
import json
import time

import httpx
import jinja2
import pytest
import torch

from grokserve.model import GrokModel
from grokserve.serving.config import ServingLimits
from grokserve.serving.loading import ByteTokenizer
from testkit.serving import LIMITS, MODEL
from testkit.tokenizers import GROK_SPECIAL

pytestmark = pytest.mark.slow
TOKENIZER = ByteTokenizer(256, GROK_SPECIAL)


@pytest.fixture(scope="module")
def http(base_url):
    with httpx.Client(base_url=base_url, timeout=60) as client:
        yield client


def complete(http, **body):
    response = http.post("/v1/completions", json={"model": MODEL, "temperature": 0, **body})
    assert response.status_code == 200, response.text
    return response.json()


def test_a_list_of_prompts_returns_the_choices_of_each_prompt_sent_alone(http):
    prompts = ["def add(a, b):", "Hello", [ord(c) + 4 for c in "xyz"]]
    alone = [complete(http, prompt=p, max_tokens=6)["choices"][0]["text"] for p in prompts]
    together = complete(http, prompt=prompts[:2], max_tokens=6)
    assert [c["text"] for c in together["choices"]] == alone[:2]
    assert [c["index"] for c in together["choices"]] == [0, 1]
    ids = complete(http, prompt=[[ord(c) + 4 for c in "Hello"], prompts[2]], max_tokens=6)
    assert [c["text"] for c in ids["choices"]] == alone[1:]
    assert ids["usage"]["prompt_tokens"] == 5 + 3


def test_completion_logprobs_and_echo_scores_equal_the_in_process_model(http):
    prompt = "The quick brown fox"
    ids = TOKENIZER.encode(prompt)
    scored = complete(http, prompt=prompt, max_tokens=0, echo=True, logprobs=2)["choices"][0]
    assert scored["text"] == prompt and scored["finish_reason"] == "length"
    logprobs = scored["logprobs"]
    assert logprobs["tokens"] == list(prompt)
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    assert logprobs["text_offset"] == list(range(len(prompt)))
    model = GrokModel.from_preset(MODEL, seed=0)
    with torch.inference_mode():
        logits = model(torch.tensor([ids]), cache=model.new_cache(1, len(ids)))[0].float()
    expected = torch.log_softmax(logits, dim=-1)[:-1].gather(1, torch.tensor(ids[1:])[:, None])
    assert logprobs["token_logprobs"][1:] == pytest.approx(expected[:, 0].tolist(), abs=1e-4)
    for top, chosen, value in zip(
        logprobs["top_logprobs"][1:],
        logprobs["tokens"][1:],
        logprobs["token_logprobs"][1:],
        strict=True,
    ):
        assert top[chosen] == value and len(top) in (2, 3)  # the top 2 and the token itself
    # Token-id prompts score the same, and generation comes after the echoed prompt.
    both = complete(http, prompt=ids, max_tokens=3, echo=True, logprobs=0)["choices"][0]
    assert both["logprobs"]["token_logprobs"][1 : len(ids)] == pytest.approx(
        logprobs["token_logprobs"][1:], abs=1e-5
    )
    assert len(both["logprobs"]["tokens"]) == len(ids) + 3
    plain = complete(http, prompt=prompt, max_tokens=3, logprobs=1)["choices"][0]
    assert both["text"] == prompt + plain["text"]
    # Equal up to float32 rounding: the echo computes every prompt position, the plain request
    # only the last (and may reuse the prompt's cached prefix blocks).
    assert plain["logprobs"]["token_logprobs"] == pytest.approx(
        both["logprobs"]["token_logprobs"][len(ids) :], abs=1e-5
    )
    assert all(value <= 0 for value in plain["logprobs"]["token_logprobs"])


def test_chat_logprobs_and_the_developer_role(http):
    messages = [
        {"role": "developer", "content": "Answer briefly."},
        {"role": "user", "content": "Hi"},
    ]
    body = {"model": MODEL, "messages": messages, "max_tokens": 4, "temperature": 0}
    response = http.post("/v1/chat/completions", json={**body, "logprobs": True, "top_logprobs": 3})
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    content = choice["logprobs"]["content"]
    assert "".join(entry["token"] for entry in content) == choice["message"]["content"]
    assert all(len(entry["top_logprobs"]) == 3 for entry in content)
    assert all(
        entry["logprob"] == max(t["logprob"] for t in entry["top_logprobs"]) for entry in content
    )
    streamed = http.post("/v1/chat/completions", json={**body, "stream": True, "logprobs": True})
    events = [
        json.loads(line[6:]) for line in streamed.text.splitlines() if line.startswith("data: {")
    ]
    tokens = [
        e["token"]
        for event in events
        for c in event["choices"]
        if c["logprobs"]
        for e in c["logprobs"]["content"]
    ]
    assert tokens == [entry["token"] for entry in content]


def test_logit_bias_penalties_and_vllm_stop_controls_change_the_output(http):
    base = complete(http, prompt="abc", max_tokens=8)["choices"][0]
    forced = complete(http, prompt="abc", max_tokens=8, logit_bias={str(ord("Q") + 4): 100})
    assert forced["choices"][0]["text"] == "Q" * 8
    repeated = complete(http, prompt="abc", max_tokens=8, logit_bias={str(ord("Q") + 4): 5})
    penalised = complete(
        http, prompt="abc", max_tokens=8, logit_bias={str(ord("Q") + 4): 5}, frequency_penalty=2
    )
    assert repeated["choices"][0]["text"] != penalised["choices"][0]["text"]
    stop_id = TOKENIZER.encode(base["text"][3])[0]
    stopped = complete(http, prompt="abc", max_tokens=8, stop_token_ids=[stop_id])["choices"][0]
    assert stopped["finish_reason"] == "stop" and base["text"].startswith(stopped["text"])
    assert len(stopped["text"]) <= 3
    # ignore_eos and min_tokens: the EOS token is never the end before min_tokens.
    eos = complete(http, prompt="abc", max_tokens=8, logit_bias={"2": 100})["choices"][0]
    assert eos["text"] == "" and eos["finish_reason"] == "stop"
    held = complete(http, prompt="abc", max_tokens=8, logit_bias={"2": 100}, min_tokens=3)
    assert held["usage"]["completion_tokens"] == 4 and held["choices"][0]["finish_reason"] == "stop"
    ignored = complete(http, prompt="abc", max_tokens=8, logit_bias={"2": 100}, ignore_eos=True)
    assert ignored["usage"]["completion_tokens"] == 8
    assert ignored["choices"][0]["finish_reason"] == "length"


def test_n_best_of_and_seed(http):
    body = {"prompt": "Hello", "max_tokens": 6, "temperature": 1.0, "seed": 3}
    first = complete(http, **body, n=2)
    assert complete(http, **body, n=2)["choices"] == first["choices"]
    best = complete(http, **body, n=1, best_of=3)
    assert len(best["choices"]) == 1 and best["choices"][0]["logprobs"] is None
    assert best["usage"]["completion_tokens"] == 18


@pytest.mark.parametrize(
    ("route", "extra", "param"),
    [
        ("/v1/chat/completions", {"response_format": {"type": "json_object"}}, "response_format"),
        ("/v1/chat/completions", {"tools": [{"type": "function"}]}, "tools"),
        ("/v1/completions", {"suffix": "end"}, "suffix"),
        ("/v1/completions", {"use_beam_search": True}, "use_beam_search"),
    ],
)
def test_parameters_that_would_change_the_output_are_refused_by_name(http, route, extra, param):
    body = {"model": MODEL, "max_tokens": 2, **extra}
    body |= {"messages": [{"role": "user", "content": "x"}]} if "chat" in route else {"prompt": "x"}
    response = http.post(route, json=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == param and param in error["message"]
    assert error["code"] == "unsupported_parameter"


def test_harmless_and_default_valued_fields_are_accepted(http):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
    extra = {"user": "me", "response_format": {"type": "text"}, "tools": None}
    assert http.post("/v1/chat/completions", json={**body, **extra}).status_code == 200


def test_a_lone_surrogate_is_a_400_naming_the_field(http):
    raw = b'{"model": "%s", "messages": [{"role": "user", "content": "a\\ud800"}]}' % MODEL.encode()
    response = http.post(
        "/v1/chat/completions", content=raw, headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "messages.0.content" and error["code"] == "invalid_unicode"
    assert "Ray" not in error["message"] and "pybind" not in error["message"]


def test_models_by_id(http):
    assert http.get(f"/v1/models/{MODEL}").json()["id"] == MODEL
    missing = http.get("/v1/models/gpt-4")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


def test_vllm_tokenizer_routes(http):
    tokens = http.post("/tokenize", json={"prompt": "Hi!", "add_special_tokens": False}).json()
    assert tokens == {
        "tokens": TOKENIZER.encode("Hi!"),
        "count": 3,
        "max_model_len": 128,
        "token_strs": None,
    }
    chat = http.post("/tokenize", json={"messages": [{"role": "user", "content": "Hi"}]}).json()
    assert chat["count"] == len("User: Hi\n\nAssistant:") + 1  # with BOS
    assert http.post("/detokenize", json={"tokens": tokens["tokens"]}).json() == {"prompt": "Hi!"}
    info = http.get("/tokenizer_info").json()
    assert info["eos_token_id"] == 2 and info["model_max_length"] == 128
    # The chat template renders what the server renders from messages.
    messages = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    template = jinja2.Environment().from_string(info["chat_template"])
    rendered = template.render(messages=messages, add_generation_prompt=True)
    as_text = http.post("/tokenize", json={"prompt": rendered}).json()["tokens"]
    assert as_text == http.post("/tokenize", json={"messages": messages}).json()["tokens"]
    bad = http.post("/detokenize", json={"tokens": [100000]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"


async def _stream_gaps(base_url, ready, done):
    """The largest gap between the events of one long stream."""
    body = {"model": MODEL, "prompt": "x", "max_tokens": 120, "temperature": 0, "stream": True}
    gaps, last = [], None
    async with (
        httpx.AsyncClient(base_url=base_url, timeout=60) as client,
        client.stream("POST", "/v1/completions", json=body) as response,
    ):
        async for _ in response.aiter_lines():
            now = time.monotonic()
            if last is not None:
                gaps.append(now - last)
            last = now
            ready.set()
    done.set()
    return max(gaps)


async def test_a_20_mib_body_is_refused_fast_while_streams_keep_flowing(base_url):
    ready, done = asyncio.Event(), asyncio.Event()
    stream = asyncio.create_task(_stream_gaps(base_url, ready, done))
    await ready.wait()
    big = json.dumps({"model": MODEL, "prompt": "a" * (20 * 1024 * 1024)}).encode()
    async with httpx.AsyncClient(base_url=base_url, timeout=60) as client:
        started = time.monotonic()
        response = await client.post(
            "/v1/completions", content=big, headers={"content-type": "application/json"}
        )
        elapsed = time.monotonic() - started

        async def chunks():  # no Content-Length: counted while read
            for _ in range(20):
                yield b"a" * (1024 * 1024)

        chunked = await client.post("/v1/completions", content=chunks())
        # Within the body limit but far beyond the context: refused before it is tokenized.
        long = await client.post(
            "/v1/completions", json={"model": MODEL, "prompt": "a" * (3 * 1024 * 1024)}
        )
    largest_gap = await stream
    assert response.status_code == 413 and elapsed < 2
    assert response.json()["error"]["code"] == "request_too_large"
    assert chunked.status_code == 413
    assert long.status_code == 400 and long.json()["error"]["param"] == "prompt"
    assert largest_gap < 2, f"a stream stalled for {largest_gap:.2f}s"


async def _half_sent_upload(
    port: int, size: int
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A POST that declares `size` bytes and sends one of them; the connection stays open."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = (
        f"POST /v1/completions HTTP/1.1\r\nhost: 127.0.0.1\r\n"
        f"content-type: application/json\r\ncontent-length: {size}\r\n\r\n{{"
    )
    writer.write(head.encode())
    await writer.drain()
    return reader, writer


def _metric(http, name: str, label: str = "") -> float:
    """The sum of the samples of `name` (those with `label` in their labels) on /metrics."""
    lines = http.get("/metrics").text.splitlines()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in lines
        if line.startswith(name + "{") and label in line
    )


def _bytes_in_flight(http) -> float:
    return _metric(http, "grokserve_ingress_body_bytes_in_flight")


def _wait_for_bytes_in_flight(http, expected: float, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while (held := _bytes_in_flight(http)) != expected:
        assert time.monotonic() < deadline, f"{held} bytes in flight, not {expected}"
        time.sleep(0.1)


async def test_uploads_beyond_the_bytes_in_flight_get_503_fast_and_give_their_bytes_back(
    base_url, http
):
    limits = ServingLimits.model_validate(LIMITS)
    size = limits.max_request_bytes
    fitting = limits.max_request_bytes_in_flight // size
    port = httpx.URL(base_url).port
    assert port is not None
    unavailable = _metric(http, "grokserve_http_requests_total", 'status="503"')
    # The budget is all but full: room for a small request, none for another large one.
    held = [await _half_sent_upload(port, size - 1024) for _ in range(fitting)]
    await asyncio.to_thread(_wait_for_bytes_in_flight, http, fitting * (size - 1024), 30)
    refused = [await _half_sent_upload(port, size) for _ in range(4)]
    started = time.monotonic()
    for reader, writer in refused:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 503") and b"retry-after: 1" in head.lower()
        writer.close()
    elapsed = time.monotonic() - started
    small = await asyncio.to_thread(complete, http, prompt="x", max_tokens=2)
    assert small["choices"][0]["finish_reason"] == "length"
    for _, writer in held:
        writer.close()
    await asyncio.to_thread(_wait_for_bytes_in_flight, http, 0, 30)
    assert elapsed < 2
    assert _metric(http, "grokserve_http_requests_total", 'status="503"') == unavailable + 4


@pytest.mark.parametrize(
    ("extra", "param"),
    [({"logit_bias": {"99999": 1}}, "logit_bias"), ({"stop_token_ids": [-1]}, "stop_token_ids")],
)
def test_token_ids_outside_the_vocabulary_are_a_400(http, extra, param):
    body = {"model": MODEL, "prompt": "x", "max_tokens": 2, **extra}
    response = http.post("/v1/completions", json=body)
    assert response.status_code == 400 and response.json()["error"]["param"] == param
    assert complete(http, prompt="x", max_tokens=2)["choices"], "the replica still serves"


def test_streamed_echo_and_logprobs_equal_the_whole_answer(http):
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 5, "echo": True, "logprobs": 1}
    whole = complete(http, **body)["choices"][0]
    streamed = http.post("/v1/completions", json={**body, "stream": True, "temperature": 0})
    chunks = [
        json.loads(line[6:]) for line in streamed.text.splitlines() if line.startswith("data: {")
    ]
    choices = [c for chunk in chunks for c in chunk["choices"]]
    assert "".join(c["text"] for c in choices) == whole["text"]
    tokens = [t for c in choices if c["logprobs"] for t in c["logprobs"]["token_logprobs"]]
    assert tokens == whole["logprobs"]["token_logprobs"]
