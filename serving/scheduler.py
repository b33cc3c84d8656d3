"""Continuous batching over KV-cache slots, with no Ray dependency (tested in-process).

Every running sequence owns one row ("slot") of the executor's KV cache. The engine loop works in
steps: at each step boundary it drops cancelled sequences, admits waiting ones into free slots (FIFO,
within the KV-token budget), runs one prefill chunk for each group of newly admitted sequences and one
decode step for every sequence already generating. So requests join and leave the running batch
between steps, prefills of requests that arrive together are one batched forward, and a long prompt is
prefilled in chunks interleaved with the decode steps of everybody else.

Every sequence also holds a block table of the paged KV cache (`grokserve.model.blocks`: 16-token
blocks, shared prefixes): waiting sequences are admitted while free slots and the blocks of their
prompts allow. A prompt's leading full blocks that the prefix cache holds are not computed again:
only the rest is prefilled. A decoding sequence takes a new block when it fills its last one; when
none is left the latest-admitted sequence is preempted (its blocks freed, itself queued first again)
and later recomputed from its prompt and the tokens it had generated, which the counter-based
sampler draws again identically.

The uncached parts of one prefill group are LEFT-padded to a common length (pads take no cache),
so every row ends at the last column, whose logits the step samples.

The scheduler is the replica's only queue (Serve's router is configured not to hold requests in
front of it, see `grokserve.serving.app`): `submit` admits a request or refuses it at once, so the
waiting count it reports is every admitted request that is not running yet.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import secrets
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from grokserve.model.blocks import DEFAULT_BLOCK_SIZE, BlockPool, BlockTable, blocks_for
from grokserve.model.sampling import SamplingParams
from grokserve.serving.admission import QUEUE_FULL_CODE, queue_full_message
from grokserve.serving.detokenize import Decoder, TextStream

log = logging.getLogger(__name__)

_DETOKENIZE_PREFIX = 4  # prompt tokens decoded in front of the generated ones (see TextStream)
FinishReason = Literal["stop", "length", "cancelled", "error"]


@dataclass(frozen=True)
class StepInput:
    """One batched forward: `tokens[i]` is appended to cache row `rows[i]` (equal lengths); with
    `tokens` None (a decode step) each row is fed the token the executor last sampled for it.

    `start` lists the rows that begin a new sequence at this step (reset them first, and seed their
    sampler with the params' seed, which the scheduler always sets). When `sample` is set the
    executor samples one next token per row, from the last position. `lookahead[i]` is the prompt
    token that follows row i's chunk (None after the prompt's last): the target of the chunk's
    last position, for rows whose params ask for prompt logprobs. For a starting row, `cached` holds
    its tokens already in the KV cache (prefix-cache hits), which its `tokens` follow, and
    `prompt_tokens` how many of its tokens are prompt (the rest were generated before a
    preemption). `blocks` is the new block table of every row whose table changed.
    """

    rows: list[int]
    tokens: list[list[int]] | None
    sample: bool
    start: dict[int, SamplingParams] = field(default_factory=dict)
    lookahead: list[int | None] | None = None
    cached: dict[int, list[int]] = field(default_factory=dict)
    prompt_tokens: dict[int, int] = field(default_factory=dict)
    blocks: dict[int, list[int]] = field(default_factory=dict)


@dataclass(frozen=True)
class TokenLogprob:
    """A token, its log-probability under the model, and the `top` most likely (token, logprob)
    at its position (as many as the params' `logprobs` asks for)."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class RowOutput:
    """What one row of a step produced: the sampled token (with `sample`), its logprob (when the
    row's params ask for logprobs) and, for rows asking for prompt logprobs, one entry per chunk
    position: the logprob of the token that follows it (None where no token follows yet)."""

    token: int | None = None
    logprob: TokenLogprob | None = None
    prompt: tuple[TokenLogprob | None, ...] = ()


class Executor(Protocol):
    """Runs model steps for up to `max_batch_size` rows over a paged KV cache of `kvCacheTokens`.

    `submit` queues the step at once (steps run in submission order) and returns an awaitable of
    one RowOutput per row, so the scheduler can queue step n + 1 before it reads step n.
    """

    def submit(self, step: StepInput) -> Awaitable[list[RowOutput]]: ...


class AdmissionError(Exception):
    """A request the scheduler will not take; `status` and `code` are what the API answers."""

    status = 400

    def __init__(self, message: str, param: str | None = None, code: str = "invalid_value") -> None:
        super().__init__(message)
        self.param = param
        self.code = code


class QueueFull(AdmissionError):
    """The admitted work is at its bound: retry after `retry_after` seconds. `any_request`: the
    bound refuses any request now, whatever its size (the ingress then refuses without asking
    until a slot frees, see `grokserve.serving.admission`)."""

    status = 429

    def __init__(
        self,
        message: str,
        retry_after: int,
        code: str = QUEUE_FULL_CODE,
        *,
        any_request: bool = False,
    ) -> None:
        super().__init__(message, code=code)
        self.retry_after = retry_after
        self.any_request = any_request


class Unavailable(QueueFull):
    """The replica cannot serve now (a model step failed); it is being replaced."""

    status = 503


@dataclass
class Delta:
    """What sequence `index` of a request emits: new text, its token count, why it ended (if it
    did), the logprobs of its new tokens (when asked for) and, in its first delta, those of the
    prompt's tokens (when asked for; the first token's is None)."""

    index: int
    text: str
    completion_tokens: int
    finish_reason: FinishReason | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None


class SchedulerObserver(Protocol):
    """Receives what the metrics need; see `grokserve.serving.metrics.ReplicaMetrics`."""

    def on_prompt(self, tokens: int, queued_seconds: float) -> None: ...
    def on_first_token(self, seconds: float) -> None: ...
    def on_finish(
        self, reason: FinishReason, seconds: float, prompt: int, generated: int
    ) -> None: ...
    def on_next_token(self, seconds: float) -> None: ...
    def on_decode_batch(self, size: int) -> None: ...
    def on_state(self, waiting: int, running: int, kv_usage: float) -> None: ...
    def on_prefix_cache(self, queried_tokens: int, hit_tokens: int) -> None: ...
    def on_preemption(self) -> None: ...


class SequenceHandle:
    """One generated sequence: its slot, progress and text; its deltas go to its Generation."""

    def __init__(
        self,
        generation: Generation,
        index: int,
        prompt: list[int],
        sampling: SamplingParams,
        text: TextStream,
        arrival: float,
    ) -> None:
        self.generation = generation
        self.index = index
        self.prompt = prompt
        self.max_tokens = sampling.max_tokens
        self.sampling = sampling
        self.text = text
        self.arrival = arrival  # wall clock, when the API received the request
        # Per padded position: the logprob of the token after it (prompt_logprobs only).
        self.position_logprobs: list[TokenLogprob | None] = []
        self.prompt_logprobs: list[TokenLogprob | None] | None = None
        self.slot: int | None = None
        self.blocks: BlockTable | None = None
        self.output: list[int] = []  # generated ids: recomputed with the prompt after a preemption
        self.epoch = 0  # bumped by each preemption: results of steps from before it are dropped
        self.generated = 0
        self.pending = 0  # decode steps submitted for this sequence but not read yet
        self.cancelled = False
        self.finish_reason: FinishReason | None = None
        self.submitted_at = time.monotonic()
        self.last_token_at = 0.0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def held_slot(self) -> int:
        """The slot of a sequence that holds one (admitted, and not released since)."""
        if self.slot is None:
            raise RuntimeError("the sequence holds no slot: it is waiting, preempted or finished")
        return self.slot

    @property
    def held_blocks(self) -> BlockTable:
        """The block table of a sequence that holds one (admitted, and not released since)."""
        if self.blocks is None:
            raise RuntimeError("the sequence holds no blocks: it is waiting, preempted or finished")
        return self.blocks

    @property
    def context(self) -> list[int]:
        """The tokens its KV cache holds once prefilled: the prompt, and after a preemption the
        tokens generated before it."""
        return self.prompt + self.output

    def emit(
        self,
        text: str,
        finish_reason: FinishReason | None = None,
        logprobs: list[TokenLogprob] | None = None,
    ) -> None:
        # Sent once, with the sequence's first delta.
        prompt_logprobs, self.prompt_logprobs = self.prompt_logprobs, None
        self.generation.deltas.put_nowait(
            Delta(
                self.index,
                text,
                self.generated,
                finish_reason,
                logprobs or [],
                prompt_logprobs,
            )
        )


class Generation:
    """The n sequences of one request: read their deltas with `async for`, stop with `cancel()`."""

    def __init__(self, scheduler: Scheduler, prompt_tokens: int) -> None:
        self._scheduler = scheduler
        self.prompt_tokens = prompt_tokens
        self.sequences: list[SequenceHandle] = []
        self.deltas: asyncio.Queue[Delta] = asyncio.Queue()

    def cancel(self) -> None:
        for handle in self.sequences:
            if not handle.finished:
                handle.cancelled = True
        self._scheduler.wake()

    async def batches(self, interval: float = 0.0) -> AsyncIterator[list[Delta]]:
        """Every delta that is ready, as one list: a slow consumer (a network hop) gets several
        tokens per message instead of falling further behind. With `interval` > 0, messages after
        the first are at least that many seconds apart (fewer, larger messages)."""
        running = len(self.sequences)
        while running:
            ready = [await self.deltas.get()]
            while not self.deltas.empty():
                ready.append(self.deltas.get_nowait())
            running -= sum(delta.finish_reason is not None for delta in ready)
            yield ready
            if interval > 0 and running:
                await asyncio.sleep(interval)

    async def __aiter__(self) -> AsyncIterator[Delta]:
        async for ready in self.batches():
            for delta in ready:
                yield delta


@dataclass
class _PrefillGroup:
    sequences: list[SequenceHandle]
    padded: dict[int, list[int]]  # id(sequence) -> left-padded prompt
    length: int
    done: int = 0


class Scheduler:
    def __init__(
        self,
        executor: Executor,
        decoder: Decoder,
        *,
        max_batch_size: int,
        max_sequence_length: int,
        max_queued_requests: int,
        kv_budget: int,
        prefill_chunk_tokens: int,
        eos_id: int | None,
        pad_id: int,
        observer: SchedulerObserver | None = None,
        block_size: int = DEFAULT_BLOCK_SIZE,
    ) -> None:
        self._executor = executor
        self._decoder = decoder
        self.max_batch_size = max_batch_size
        self.max_sequence_length = max_sequence_length
        self.max_queued_requests = max_queued_requests
        self.kv_budget = kv_budget
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self._eos_id = eos_id
        self._pad_id = pad_id
        self._observer = observer
        self._blocks = BlockPool(blocks_for(kv_budget, block_size), block_size)
        self._free_slots = list(range(max_batch_size - 1, -1, -1))
        self._waiting: deque[SequenceHandle] = deque()
        self._prefilling: list[_PrefillGroup] = []
        self._decoding: list[SequenceHandle] = []
        self._in_flight: (
            tuple[list[tuple[SequenceHandle, int]], Awaitable[list[RowOutput]]] | None
        ) = None
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._seconds_per_request = 1.0  # running mean, for Retry-After
        self.broken = False  # a model step failed: refuse everything until replaced

    # -- requests -------------------------------------------------------------------------------

    def submit(
        self,
        prompt: Sequence[int],
        sampling: SamplingParams,
        *,
        stop: Sequence[str] = (),
        n: int = 1,
        arrival: float | None = None,
    ) -> Generation:
        """Queue `n` sequences for one prompt, or raise AdmissionError (nothing queued then).

        `arrival` (wall clock, default now) is when the request reached the API: time to first
        token and end-to-end latency are measured from it."""
        prompt = list(prompt)
        self.check_context(len(prompt), sampling.max_tokens)
        if n > self.max_batch_size:
            raise AdmissionError(
                f"n={n} exceeds this replica's batch size (maxBatchSize={self.max_batch_size})",
                param="n",
            )
        self._check_capacity(n, len(prompt) + sampling.max_tokens)
        generation = Generation(self, len(prompt))
        # The seed is chosen here, once, when the request has none: every shard worker of a
        # sharded replica must sample the same token, so none of them may draw its own seed.
        # 62 bits, as the API allows, so that seed + index stays a valid torch seed.
        base_seed = sampling.seed if sampling.seed is not None else secrets.randbits(62)
        arrival = time.time() if arrival is None else arrival
        for index in range(n):
            params = dataclasses.replace(sampling, seed=base_seed + index)
            text = TextStream(self._decoder, stop, prefix=prompt[-_DETOKENIZE_PREFIX:])
            generation.sequences.append(
                SequenceHandle(generation, index, prompt, params, text, arrival)
            )
        self._waiting.extend(generation.sequences)
        self.wake()
        return generation

    def check_context(self, prompt_tokens: int, max_tokens: int) -> None:
        """Raise AdmissionError (400) unless prompt + max_tokens can ever run on this replica."""
        limit = self.max_sequence_length
        if not prompt_tokens:
            raise AdmissionError("the prompt is empty (it has no tokens)", param="prompt")
        if prompt_tokens >= limit and max_tokens:
            raise AdmissionError(
                f"the prompt has {prompt_tokens} tokens; the context limit (maxSequenceLength) is "
                f"{limit} tokens, including at least one generated token",
                param="prompt",
                code="context_length_exceeded",
            )
        if prompt_tokens + max_tokens > limit:
            raise AdmissionError(
                f"prompt ({prompt_tokens} tokens) + max_tokens ({max_tokens}) exceeds the context "
                f"limit (maxSequenceLength) of {limit} tokens",
                param="max_tokens" if prompt_tokens < limit else "prompt",
                code="context_length_exceeded",
            )
        if not self._blocks.could_hold(prompt_tokens + max_tokens):
            raise AdmissionError(
                f"prompt ({prompt_tokens} tokens) + max_tokens ({max_tokens}) exceeds this "
                f"replica's KV-cache budget (kvCacheTokens) of {self.kv_budget} tokens",
                param="max_tokens",
            )

    def _check_capacity(self, n: int, tokens_each: int) -> None:
        """Raise QueueFull (429) if admitting n sequences of `tokens_each` (prompt + max_tokens)
        would put more than the queue's bound waiting: maxQueuedRequests sequences, or that many
        slots' share of the KV budget in tokens (so long requests queue fewer)."""
        if self.broken:
            raise Unavailable(
                "the model replica failed and is being replaced; retry later",
                retry_after=5,
                code="service_unavailable",
            )
        queued_before = len(self._waiting) - len(self._free_slots)
        if queued_before + n > self.max_queued_requests:
            raise QueueFull(
                queue_full_message(self.max_queued_requests),
                retry_after=self.retry_after_seconds(),
                any_request=queued_before + 1 > self.max_queued_requests,
            )
        waiting_tokens = sum(len(h.prompt) + h.max_tokens for h in self._waiting)
        beyond_cache = self._reserved_tokens() + waiting_tokens + n * tokens_each - self.kv_budget
        bound = self.kv_budget * self.max_queued_requests // self.max_batch_size
        if beyond_cache > bound:
            raise QueueFull(
                f"the queued requests' prompt + max_tokens reach this replica's bound ({bound} "
                f"tokens beyond the KV-cache budget kvCacheTokens={self.kv_budget}, maxQueuedRequests="
                f"{self.max_queued_requests}); retry later",
                retry_after=self.retry_after_seconds(),
            )

    def retry_after_seconds(self) -> int:
        waves = (len(self._waiting) + self.max_batch_size - 1) // self.max_batch_size
        return max(1, round(waves * self._seconds_per_request))

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._decoding) + sum(len(g.sequences) for g in self._prefilling)

    # -- engine loop ----------------------------------------------------------------------------

    def start(self) -> None:
        """Run the engine loop on the running event loop (again after `stop`, on another loop)."""
        if self._task is None:
            # An asyncio.Event binds to the loop that first waits on it: a new one per start.
            # No wake-up is lost: the loop looks at its queues before it first waits.
            self._wakeup = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._run(), name="scheduler")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def wake(self) -> None:
        self._wakeup.set()

    @property
    def alive(self) -> bool:
        """The engine loop is running (it only ends by `stop` or an unexpected error)."""
        return self._task is not None and not self._task.done()

    async def _run(self) -> None:
        while True:
            if not (self._waiting or self._prefilling or self._decoding or self._in_flight):
                self._report_state()
                self._wakeup.clear()
                await self._wakeup.wait()
            self._drop_cancelled()
            self._admit()
            self._report_state()
            try:
                for group in list(self._prefilling):
                    await self._prefill_chunk(group)
                if self._decoding or self._in_flight:
                    await self._decode_step()
            except Exception:
                # A shard worker died or the model failed: this replica's cache state is lost.
                # Serve's health check replaces it; until then it refuses (503) all requests.
                log.exception("model step failed; failing every request until replaced")
                self.broken = True
                self._fail_running()
            # Let consumers (HTTP streams) and new submissions run between steps.
            await asyncio.sleep(0)

    def _drop_cancelled(self) -> None:
        for handle in [h for h in self._waiting if h.cancelled or self.broken]:
            self._waiting.remove(handle)
            self._finish(handle, "error" if self.broken else "cancelled")
        for group in self._prefilling:
            for handle in [h for h in group.sequences if h.cancelled]:
                group.sequences.remove(handle)
                self._finish(handle, "cancelled")
        self._prefilling = [g for g in self._prefilling if g.sequences]
        for handle in [h for h in self._decoding if h.cancelled]:
            self._decoding.remove(handle)
            self._finish(handle, "cancelled")

    def _reserved_tokens(self) -> int:
        """Tokens the running sequences may still hold: prompt + max_tokens each."""
        running = [h for g in self._prefilling for h in g.sequences] + self._decoding
        return sum(len(h.prompt) + h.max_tokens for h in running)

    def _admit(self) -> None:
        """Move waiting sequences (FIFO) into free slots as ONE new prefill group, each with the
        blocks of its context and its first generated token (prefix-cache hits shared)."""
        group: list[SequenceHandle] = []
        while self._waiting and len(group) < len(self._free_slots):
            candidate = self._waiting[0]
            context = candidate.context
            # Prompt logprobs need every prompt position computed: no prefix-cache hits for them.
            shared = not candidate.sampling.prompt_logprobs
            table = self._blocks.allocate(context, len(context) + 1, shared)
            if table is None:
                break
            self._waiting.popleft()
            candidate.blocks = table
            group.append(candidate)
            if self._observer and shared:
                self._observer.on_prefix_cache(len(context), table.cached_tokens)
        if not group:
            return
        suffixes = {id(h): h.context[h.held_blocks.cached_tokens :] for h in group}
        length = max(len(suffix) for suffix in suffixes.values())
        padded = {}
        now = time.monotonic()
        for handle in group:
            handle.slot = self._free_slots.pop()
            suffix = suffixes[id(handle)]
            padded[id(handle)] = [self._pad_id] * (length - len(suffix)) + suffix
            if self._observer and not handle.output:
                self._observer.on_prompt(len(handle.prompt), now - handle.submitted_at)
        self._prefilling.append(_PrefillGroup(group, padded, length))

    async def _prefill_chunk(self, group: _PrefillGroup) -> None:
        chunk = min(self.prefill_chunk_tokens, group.length - group.done)
        end = group.done + chunk
        last = end == group.length
        first = group.done == 0
        sequences = group.sequences
        step = StepInput(
            rows=[h.held_slot for h in sequences],
            tokens=[group.padded[id(h)][group.done : end] for h in sequences],
            sample=last,
            start={h.held_slot: h.sampling for h in sequences} if first else {},
            lookahead=[None if last else group.padded[id(h)][end] for h in sequences],
            cached={h.held_slot: h.context[: h.held_blocks.cached_tokens] for h in sequences}
            if first
            else {},
            prompt_tokens={h.held_slot: len(h.prompt) for h in sequences} if first else {},
            blocks={h.held_slot: list(h.held_blocks.blocks) for h in sequences} if first else {},
        )
        outputs = await self._executor.submit(step)
        group.done = end
        for handle, output in zip(group.sequences, outputs, strict=True):
            handle.position_logprobs.extend(output.prompt)
        if not last:
            return
        self._prefilling.remove(group)
        for handle, output in zip(group.sequences, outputs, strict=True):
            self._blocks.cache_full_blocks(handle.held_blocks, handle.context)
            if handle.sampling.prompt_logprobs and not handle.output:  # not again on a recompute
                # Position p holds the logprob of token p + 1; pads come first and the prompt's
                # first token has nothing before it to be predicted from.
                pads = group.length - len(handle.prompt)
                handle.prompt_logprobs = [None, *handle.position_logprobs[pads : group.length - 1]]
            handle.position_logprobs = []
            if handle.max_tokens == 0:  # scoring the prompt only (echo with max_tokens 0)
                self._finish(handle, "length")
                continue
            self._decoding.append(handle)
            self._accept(handle, output)

    async def _decode_step(self) -> None:
        """Submit the next decode step, then read the previous one's tokens: the executor computes
        step n + 1 while this loop turns step n's tokens into text. A sequence that ends at step n
        wastes its row's step n + 1 (discarded); none is submitted past its max_tokens, so a row
        never outgrows the cache."""
        batch = [h for h in self._decoding if h.generated + h.pending < h.max_tokens]
        grown = self._grow_blocks(batch)
        batch = [h for h in batch if h.slot is not None]  # some may have been preempted
        submitted = None
        if batch:
            for handle in batch:
                handle.pending += 1
            step = StepInput(
                rows=[h.held_slot for h in batch],
                tokens=None,
                sample=True,
                blocks={h.held_slot: list(h.held_blocks.blocks) for h in batch if h in grown},
            )
            if self._observer:
                self._observer.on_decode_batch(len(batch))
            submitted = ([(h, h.epoch) for h in batch], self._executor.submit(step))
        previous, self._in_flight = self._in_flight, submitted
        if previous is not None:
            done, result = previous
            outputs = await result
            for (handle, epoch), output in zip(done, outputs, strict=True):
                if handle.epoch != epoch:
                    continue  # preempted since: this token is drawn again after its recompute
                handle.pending -= 1
                if not handle.finished:
                    self._accept(handle, output)

    def _grow_blocks(self, batch: list[SequenceHandle]) -> list[SequenceHandle]:
        """Blocks for the token each sequence of `batch` writes at this step; when they run out,
        the latest-admitted sequences are preempted. Returns the sequences whose tables grew."""
        grown = []
        for handle in batch:
            if handle.slot is None:
                continue
            before = len(handle.held_blocks.blocks)
            # The step writes the last sampled token: the cache then holds prompt + generated.
            tokens = len(handle.prompt) + handle.generated + handle.pending
            while handle.slot is not None and not self._blocks.grow(handle.held_blocks, tokens):
                self._preempt(self._decoding[-1])
            if handle.slot is not None and len(handle.held_blocks.blocks) > before:
                grown.append(handle)
        return grown

    def _preempt(self, handle: SequenceHandle) -> None:
        """Free its blocks and slot and queue it first, to be recomputed when blocks allow."""
        self._decoding.remove(handle)
        self._release(handle)
        handle.pending = 0
        handle.epoch += 1
        self._waiting.appendleft(handle)
        if self._observer:
            self._observer.on_preemption()

    def _accept(self, handle: SequenceHandle, output: RowOutput) -> None:
        """A sampled token for `handle`: emit its text, finish it at EOS (unless ignored), a stop
        token id, a stop string or a limit."""
        now = time.monotonic()
        token = output.token
        assert token is not None, "a sampling step returns a token for every row"
        if self._observer:
            if handle.generated == 0:
                self._observer.on_first_token(time.time() - handle.arrival)
            else:
                self._observer.on_next_token(now - handle.last_token_at)
        handle.last_token_at = now
        handle.generated += 1
        handle.output.append(token)
        logprobs = [output.logprob] if output.logprob is not None else []
        params = handle.sampling
        if (token == self._eos_id and params.stop_on_eos) or token in params.stop_token_ids:
            # Text held back as the possible start of a stop string is final now.
            self._retire(handle, handle.text.flush(), "stop", logprobs)
            return
        text = handle.text.push(token)
        if handle.text.stopped:
            self._retire(handle, text, "stop", logprobs)
        elif (
            handle.generated >= handle.max_tokens
            or len(handle.prompt) + handle.generated >= self.max_sequence_length
        ):
            self._retire(handle, text + handle.text.flush(), "length", logprobs)
        else:
            handle.emit(text, logprobs=logprobs)

    def _retire(
        self,
        handle: SequenceHandle,
        text: str,
        reason: FinishReason,
        logprobs: list[TokenLogprob],
    ) -> None:
        self._decoding.remove(handle)
        self._finish(handle, reason, text, logprobs)

    def _finish(
        self,
        handle: SequenceHandle,
        reason: FinishReason,
        text: str = "",
        logprobs: list[TokenLogprob] | None = None,
    ) -> None:
        handle.emit(text, reason, logprobs)
        handle.finish_reason = reason
        if self._observer:
            seconds = time.time() - handle.arrival
            self._observer.on_finish(reason, seconds, len(handle.prompt), handle.generated)
        self._release(handle)
        elapsed = time.monotonic() - handle.submitted_at
        self._seconds_per_request = 0.9 * self._seconds_per_request + 0.1 * elapsed

    def _release(self, handle: SequenceHandle) -> None:
        if handle.slot is not None:
            self._free_slots.append(handle.slot)
            handle.slot = None
        if handle.blocks is not None:
            self._blocks.free(handle.blocks)
            handle.blocks = None

    def _fail_running(self) -> None:
        self._in_flight = None
        for group in self._prefilling:
            for handle in group.sequences:
                self._finish(handle, "error")
        for handle in self._decoding:
            self._finish(handle, "error")
        self._prefilling.clear()
        self._decoding.clear()

    def _report_state(self) -> None:
        if self._observer is None:
            return
        blocks = self._blocks
        self._observer.on_state(self.waiting, self.running, blocks.used / blocks.num_blocks)
