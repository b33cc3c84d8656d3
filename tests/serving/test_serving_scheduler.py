"""The continuous-batching scheduler in-process, over the real grok-tiny model (no Ray)."""

import asyncio
import dataclasses

import pytest
import torch

from grokserve.model import GrokModel
from grokserve.model.sampling import SamplingParams, generate
from grokserve.serving.executor import LocalExecutor, ModelStepper
from grokserve.serving.loading import ByteTokenizer
from grokserve.serving.metrics import ReplicaMetrics
from grokserve.serving.scheduler import (
    AdmissionError,
    QueueFull,
    RowOutput,
    Scheduler,
    StepInput,
)
from grokserve.serving.schemas import CHAT_STOP, ChatMessage, render_chat
from testkit.tokenizers import GROK_SPECIAL

TOKENIZER = ByteTokenizer(256, GROK_SPECIAL)
GREEDY = SamplingParams(temperature=0)
PROMPTS = [f"{i}: {'the quick brown fox ' * (i % 4)}jumps" for i in range(12)]


@pytest.fixture(scope="module")
def model():
    return GrokModel.from_preset("grok-tiny", seed=0)


@pytest.fixture
async def make_scheduler(model):
    made = []

    def make(record=None, **overrides):
        limits = {
            "max_batch_size": 4,
            "max_sequence_length": 128,
            "max_queued_requests": 32,
            "kv_budget": 4 * 128,
            "prefill_chunk_tokens": 16,
            **overrides,
        }
        stepper = ModelStepper(
            model,
            max_batch_size=limits["max_batch_size"],
            max_len=limits["max_sequence_length"],
            kv_cache_tokens=limits["kv_budget"],
        )
        metrics = ReplicaMetrics("test", "r0")
        executor = LocalExecutor(stepper)
        scheduler = Scheduler(
            executor if record is None else RecordingExecutor(executor, record),
            TOKENIZER,
            eos_id=model.config.eos_token,
            pad_id=model.config.pad_token,
            observer=metrics,
            **limits,
        )
        scheduler.start()
        made.append((scheduler, executor))
        return scheduler, metrics

    yield make
    for scheduler, executor in made:
        await scheduler.stop()
        executor.close()


class RecordingExecutor:
    """Appends every step the scheduler submits to `steps`, then runs it."""

    def __init__(self, executor, steps):
        self.executor = executor
        self.steps = steps

    def submit(self, step):
        self.steps.append(step)
        return self.executor.submit(step)


class ScriptedExecutor:
    """Samples `script`'s tokens in order (then `filler`), without a model."""

    def __init__(self, script, filler):
        self.script = list(script)
        self.filler = filler

    def submit(self, step):
        sampled = asyncio.get_running_loop().create_future()
        sampled.set_result(
            [
                RowOutput(self.script.pop(0) if self.script else self.filler)
                if step.sample
                else RowOutput()
                for _ in step.rows
            ]
        )
        return sampled


def submit(scheduler, prompt, max_tokens=12, sampling=GREEDY, **kwargs):
    params = dataclasses.replace(sampling, max_tokens=max_tokens)
    return scheduler.submit(prompt, params, **kwargs)


async def collect(scheduler, prompt, **kwargs):
    generation = submit(scheduler, TOKENIZER.encode(prompt), **kwargs)
    texts: dict[int, str] = {}
    reasons: dict[int, str] = {}
    tokens: dict[int, int] = {}
    async for delta in generation:
        texts[delta.index] = texts.get(delta.index, "") + delta.text
        tokens[delta.index] = delta.completion_tokens
        if delta.finish_reason:
            reasons[delta.index] = delta.finish_reason
    order = sorted(texts)
    return [texts[i] for i in order], [reasons[i] for i in order], [tokens[i] for i in order]


def reference(model, prompt, max_tokens=12):
    """The model package's own single-sequence greedy loop."""
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    ids = generate(model, TOKENIZER.encode(prompt), params)
    return TOKENIZER.decode([i for i in ids if i != model.config.eos_token])


def sample_value(metrics, name):
    return next(
        sample.value
        for family in metrics.registry.collect()
        for sample in family.samples
        if sample.name == name
    )


async def test_concurrent_greedy_equals_the_single_sequence_reference(model, make_scheduler):
    # Chunks of 8 tokens: the longer prompts are prefilled over several steps, interleaved.
    scheduler, metrics = make_scheduler(prefill_chunk_tokens=8)
    results = await asyncio.gather(*(collect(scheduler, p) for p in PROMPTS))
    assert [texts[0] for texts, _, _ in results] == [reference(model, p) for p in PROMPTS]
    steps = sample_value(metrics, "grokserve_decode_batch_size_count")
    sequences = sample_value(metrics, "grokserve_decode_batch_size_sum")
    assert sequences / steps > 2, "the running batch should mostly be full (4 slots, 12 requests)"
    assert sample_value(metrics, "grokserve_prompt_tokens_total") == sum(
        len(TOKENIZER.encode(p)) for p in PROMPTS
    )
    assert scheduler.running == 0 and scheduler.waiting == 0


async def test_stop_string_and_max_tokens(model, make_scheduler):
    scheduler, _ = make_scheduler()
    full = reference(model, PROMPTS[3], max_tokens=12)
    stop = full[4:6]
    texts, reasons, _ = await collect(scheduler, PROMPTS[3], stop=[stop, "never-there"])
    assert texts == [full[: full.index(stop)]] and reasons == ["stop"]
    texts, reasons, tokens = await collect(scheduler, PROMPTS[3], max_tokens=5)
    assert reasons == ["length"] and tokens == [5] and full.startswith(texts[0])


async def test_n_samples_are_reproducible_with_a_seed(make_scheduler):
    scheduler, _ = make_scheduler()
    sampling = SamplingParams(temperature=1.0, top_p=0.9, seed=7)
    first, _, _ = await collect(scheduler, PROMPTS[1], n=3, sampling=sampling)
    second, _, _ = await collect(scheduler, PROMPTS[1], n=3, sampling=sampling)
    assert first == second and len(first) == 3
    assert len(set(first)) > 1, "the n choices use different seeds"


async def test_cancel_frees_the_slot_for_waiting_requests(model, make_scheduler):
    scheduler, _ = make_scheduler(max_batch_size=1, max_sequence_length=128, kv_budget=128)
    long_one = submit(scheduler, TOKENIZER.encode("abc"), max_tokens=100)
    waiting = asyncio.create_task(collect(scheduler, PROMPTS[2]))
    async for delta in long_one:
        assert delta.completion_tokens == 1
        long_one.cancel()
        break
    texts, reasons, _ = await asyncio.wait_for(waiting, timeout=60)
    assert texts == [reference(model, PROMPTS[2])] and reasons == ["length"]
    assert long_one.sequences[0].finish_reason == "cancelled"


async def test_admission_errors_name_the_limit(make_scheduler):
    scheduler, _ = make_scheduler(max_batch_size=1, max_queued_requests=1, kv_budget=128)
    with pytest.raises(AdmissionError, match=r"maxSequenceLength\) is 128"):
        submit(scheduler, [5] * 200, max_tokens=1)
    with pytest.raises(AdmissionError, match="max_tokens") as error:
        submit(scheduler, [5] * 100, max_tokens=50)
    assert error.value.param == "max_tokens"
    running = submit(scheduler, [5, 6], max_tokens=100)
    queued = submit(scheduler, [5, 6], max_tokens=100)
    with pytest.raises(QueueFull, match="maxQueuedRequests=1") as full:
        submit(scheduler, [5, 6], max_tokens=100)
    assert full.value.status == 429 and full.value.retry_after >= 1
    running.cancel()
    queued.cancel()


async def test_a_full_queue_says_whether_it_refuses_any_request(make_scheduler):
    scheduler, _ = make_scheduler(max_batch_size=2, max_queued_requests=2, kv_budget=256)
    admitted = [submit(scheduler, [5, 6], max_tokens=100) for _ in range(3)]  # 2 run, 1 waits
    with pytest.raises(QueueFull, match="maxQueuedRequests=2") as too_many:
        submit(scheduler, [5, 6], max_tokens=100, n=2)
    assert not too_many.value.any_request, "one sequence still fits the queue"
    admitted.append(submit(scheduler, [5, 6], max_tokens=100))
    with pytest.raises(QueueFull, match="maxQueuedRequests=2") as full:
        submit(scheduler, [5, 6], max_tokens=1)
    assert full.value.any_request, "no request of any size fits: the ingress may repeat it"
    for generation in admitted:
        generation.cancel()


async def test_stream_interval_sends_fewer_larger_messages(model, make_scheduler):
    scheduler, _ = make_scheduler()
    prompt = TOKENIZER.encode(PROMPTS[5])
    generation = submit(scheduler, prompt, max_tokens=30)
    messages = [ready async for ready in generation.batches(interval=0.05)]
    assert messages[0][0].completion_tokens == 1, "the first token is not held back"
    assert len(messages) < 30
    text = "".join(delta.text for ready in messages for delta in ready)
    assert text == reference(model, PROMPTS[5], max_tokens=30)


async def test_the_scheduler_chooses_the_seed_of_an_unseeded_request(make_scheduler):
    # Every shard worker of a sharded replica runs the same step: a seed it drew itself would
    # differ between ranks, so the step inputs must carry one concrete seed per sequence.
    steps = []
    scheduler, _ = make_scheduler(record=steps, prefill_chunk_tokens=8)
    unseeded = SamplingParams(temperature=1.0)
    await collect(scheduler, PROMPTS[3], n=2, sampling=unseeded)
    await collect(scheduler, PROMPTS[3], n=1, sampling=unseeded)
    starts = [params for step in steps for params in step.start.values()]
    seeds = [params.seed for params in starts]
    assert len(seeds) == 3 and all(isinstance(seed, int) for seed in seeds), seeds
    assert seeds[1] == seeds[0] + 1, "the n sequences of one request use seed, seed + 1, ..."
    assert seeds[2] != seeds[0], "another unseeded request gets another seed"
    assert len(steps) > 3 and all(not step.start for step in steps[1:] if step.tokens is None), (
        "only the first prefill chunk seeds a row; decode steps reuse its generator"
    )


def test_the_executor_refuses_a_row_without_a_seed(model):
    stepper = ModelStepper(model, max_batch_size=1, max_len=16, kv_cache_tokens=16)
    step = StepInput(rows=[0], tokens=[[5, 6]], sample=True, start={0: SamplingParams(seed=None)})
    with pytest.raises(ValueError, match="without a seed"):
        stepper.run(step)


def scripted_scheduler(script, eos=GROK_SPECIAL.eos):
    """A one-slot scheduler whose 'model' samples `script`, then EOS."""
    return Scheduler(
        ScriptedExecutor(script, filler=eos),
        TOKENIZER,
        max_batch_size=1,
        max_sequence_length=64,
        max_queued_requests=1,
        kv_budget=64,
        prefill_chunk_tokens=64,
        eos_id=eos,
        pad_id=GROK_SPECIAL.pad,
    )


async def test_text_held_back_for_a_stop_string_is_sent_at_eos():
    # "\n\n" could begin the chat stop string "\n\nUser:", so it is held back until EOS ends
    # the sequence; then it is part of the answer.
    scheduler = scripted_scheduler(TOKENIZER.encode("a\n\n"))
    scheduler.start()
    try:
        prompt = render_chat([ChatMessage(role="user", content="hi")])
        texts, reasons, tokens = await asyncio.wait_for(
            collect(scheduler, prompt, stop=[CHAT_STOP]), timeout=10
        )
    finally:
        await scheduler.stop()
    assert texts == ["a\n\n"] and reasons == ["stop"] and tokens == [4]


def test_a_scheduler_runs_again_on_another_event_loop():
    # bench/serve.py measures one scheduler in two asyncio.run calls.
    scheduler = scripted_scheduler(TOKENIZER.encode("hello world"))

    async def one_request():
        scheduler.start()
        try:
            return await asyncio.wait_for(collect(scheduler, "x", max_tokens=5), timeout=10)
        finally:
            await scheduler.stop()

    assert asyncio.run(one_request())[0] == ["hello"]
    assert asyncio.run(one_request())[0] == [" worl"]


async def test_kv_blocks_not_slots_bound_the_running_batch(model, make_scheduler):
    # 2048 cache tokens as max_len slots would hold 4 sequences of 512; in 16-token blocks the 32
    # short requests all run at once, and each says what it says alone.
    scheduler, metrics = make_scheduler(
        max_batch_size=64, max_sequence_length=512, kv_budget=2048, prefill_chunk_tokens=256
    )
    prompts = [f"{i} {PROMPTS[i % len(PROMPTS)]}" for i in range(32)]
    results = await asyncio.gather(*(collect(scheduler, p) for p in prompts))
    assert [texts[0] for texts, _, _ in results] == [reference(model, p) for p in prompts]
    batches = next(
        family
        for family in metrics.registry.collect()
        if family.name == "grokserve_decode_batch_size"
    )
    full = [s for s in batches.samples if s.name.endswith("_bucket") and s.labels["le"] == "16.0"]
    steps = sample_value(metrics, "grokserve_decode_batch_size_count")
    assert full[0].value < steps, "some decode step ran more than 16 sequences"
    assert sample_value(metrics, "grokserve_decode_batch_size_sum") / steps > 16


async def test_a_repeated_prompt_hits_the_prefix_cache_with_the_same_text(model, make_scheduler):
    scheduler, metrics = make_scheduler(prefill_chunk_tokens=16)
    prompt = "the quick brown fox jumps over the lazy dog, " * 2  # 90 tokens
    first, _, _ = await collect(scheduler, prompt)
    assert sample_value(metrics, "grokserve_prefix_cache_hits_total") == 0
    second, _, _ = await collect(scheduler, prompt)
    assert first == second == [reference(model, prompt)]
    # The 89 tokens before the last hold 5 full 16-token blocks.
    assert sample_value(metrics, "grokserve_prefix_cache_hits_total") == 80
    assert sample_value(metrics, "grokserve_prefix_cache_queries_total") == 180


async def test_running_out_of_blocks_preempts_and_recomputes_the_same_outputs(
    model, make_scheduler
):
    # 6 blocks of 16 tokens for 4 sequences that each grow to 2 blocks: some are preempted while
    # decoding and recomputed later, greedy and sampled alike.
    scheduler, metrics = make_scheduler(kv_budget=96, prefill_chunk_tokens=64)
    sampled = SamplingParams(temperature=1.0, top_k=20, seed=11)
    prompts = [f"{i}: jumps" for i in range(4)]
    kwargs = {"max_tokens": 20}
    alone = [await collect(scheduler, p, sampling=sampled, **kwargs) for p in prompts]
    assert sample_value(metrics, "grokserve_preemptions_total") == 0
    together = await asyncio.gather(
        *(collect(scheduler, p, sampling=sampled, **kwargs) for p in prompts)
    )
    greedy = await asyncio.gather(*(collect(scheduler, p, **kwargs) for p in prompts))
    assert sample_value(metrics, "grokserve_preemptions_total") > 0
    assert together == alone
    assert [g[0][0] for g in greedy] == [reference(model, p, max_tokens=20) for p in prompts]


async def test_echo_scores_every_prompt_token_across_chunks_and_pads(model, make_scheduler):
    # Two prompts of different lengths in one prefill group (the shorter is left-padded), in
    # chunks of 8: each prompt token's logprob is the model's, the first is None.
    scheduler, _ = make_scheduler(prefill_chunk_tokens=8)
    scoring = SamplingParams(temperature=0, max_tokens=0, logprobs=2, prompt_logprobs=True)
    texts = ["the quick brown fox jumps over", "lazy dogs"]
    generations = [scheduler.submit(TOKENIZER.encode(t), scoring) for t in texts]
    for text, generation in zip(texts, generations, strict=True):
        deltas = [delta async for delta in generation]
        assert [d.finish_reason for d in deltas] == ["length"] and deltas[0].completion_tokens == 0
        ids = TOKENIZER.encode(text)
        scored = deltas[0].prompt_logprobs
        assert scored[0] is None and [entry.token for entry in scored[1:]] == ids[1:]
        with torch.inference_mode():
            logits = model(torch.tensor([ids]), cache=model.new_cache(1, len(ids)))[0]
        expected = torch.log_softmax(logits.float(), dim=-1)
        for position, entry in enumerate(scored[1:], start=1):
            assert entry.logprob == pytest.approx(
                expected[position - 1, ids[position]].item(), abs=1e-4
            )
            assert len(entry.top) == 2


async def test_long_requests_queue_fewer_the_kv_tokens_bound_the_queue(make_scheduler):
    # 4 slots share 256 KV tokens; the queue holds 4 slots' share beyond them (256 tokens).
    scheduler, _ = make_scheduler(max_queued_requests=4, kv_budget=256)
    long = SamplingParams(temperature=0, max_tokens=120)
    admitted = [scheduler.submit([5, 6], long) for _ in range(4)]
    with pytest.raises(QueueFull, match="kvCacheTokens=256") as full:
        scheduler.submit([5, 6], long)
    assert full.value.status == 429 and full.value.retry_after >= 1
    assert not full.value.any_request, "a shorter request still fits"
    short = scheduler.submit([5, 6], SamplingParams(temperature=0, max_tokens=4))
    for generation in [*admitted, short]:
        generation.cancel()
