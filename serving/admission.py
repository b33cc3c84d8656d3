"""The ingress's admission gate: refusals the scheduler would give, answered without asking it.

Under a burst of many times what the replicas admit, asking the replica's scheduler for every
request costs a round trip through Ray per refusal, on an ingress event loop that also parses every
request: on 2 cores the 429s then took seconds. The scheduler stays the one source of truth for
admission; the gate only remembers its last answer that holds for ANY request (the queue is full
by count, see `QueueFull.any_request`) and repeats it while nothing can have changed:

- while the gate is closed, a request is forwarded only with a pass; without one it gets the
  scheduler's last refusal (429, same message and Retry-After) at once;
- an admitted request's end frees a slot, so it adds a pass; an admission (room was there) adds
  two, so a freed-up or newly added replica fills up fast; a forwarded request that got no
  admission answer (an invalid request, a failed replica) gives its pass back;
- a refusal for any request closes the gate again and drops the passes;
- a gate closed for the refusal's own Retry-After hands out one pass by itself, so it never
  outlives the time the server told clients to wait, whatever it missed.

So the only requests refused without asking are those that arrive while the scheduler has just
said "full" and no slot has been freed since.

In front of the ingress, Serve's HTTP proxy refuses what cannot fit by count
(`grokserve.serving.proxy_gate`), told the replicas' capacity by the headers below.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

# The routes whose requests the scheduler admits (the ingress indexes them: completions first).
GENERATION_ROUTES = ("/v1/completions", "/v1/chat/completions")
# On every ingress response, JSON: {"prefix": the app's route prefix ("" for /), "capacity":
# requests all running replicas hold at most (maxBatchSize + maxQueuedRequests each), "retryAfter",
# "body": the 429 body the ingress would answer when they are full}.
CAPACITY_HEADER = "x-grokserve-capacity"
# A refusal because the queue is full (429).
QUEUE_FULL_CODE = "rate_limit_exceeded"
# From the proxy to the ingress: "ROUTE=COUNT,...", the 429s the proxy answered itself since its
# last report, for the ingress's request counter.
REFUSALS_HEADER = "x-grokserve-proxy-refusals"


def queue_full_message(max_queued_requests: int) -> str:
    return f"the request queue is full (maxQueuedRequests={max_queued_requests}); retry later"


@dataclass(frozen=True)
class Refusal:
    """The scheduler's 429 that holds for any request: what the gate repeats."""

    message: str
    code: str
    retry_after: int


class AdmissionGate:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.refusal: Refusal | None = None  # None: open, every request is forwarded
        self.passes = 0
        self._closed_at = 0.0

    def check(self) -> tuple[bool, Refusal | None]:
        """For a request that just arrived: whether it takes a pass (forwarded while the gate is
        closed: `give_back` it unless the scheduler admits or refuses it), and the refusal to answer
        now (None: forward it to the scheduler)."""
        refusal = self.refusal
        if refusal is None:
            return False, None
        if self.passes == 0 and self._clock() - self._closed_at >= refusal.retry_after:
            self.passes = 1
            self._closed_at = self._clock()
        if self.passes > 0:
            self.passes -= 1
            return True, None
        return False, refusal

    def refused(self, refusal: Refusal) -> None:
        """The scheduler refused a request, and would refuse any request now."""
        self.refusal = refusal
        self.passes = 0
        self._closed_at = self._clock()

    def admitted(self) -> None:
        if self.refusal is not None:
            self.passes += 2

    def finished(self) -> None:
        """An admitted request ended: its slot is free."""
        if self.refusal is not None:
            self.passes += 1

    def give_back(self) -> None:
        """A request that took a pass got no admission answer (it was invalid, or failed)."""
        if self.refusal is not None:
            self.passes += 1
