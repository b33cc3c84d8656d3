"""Replica metrics (prometheus-client) and their merge into one exposition for `/metrics`.

Each replica keeps its own registry, labelled with the deployment and replica. The replicas push
snapshots of it to the single MetricsHub deployment, and the ingress serves the merged text at
`GET /metrics` on the API port, so one scrape target shows every replica (`grokserve_requests_waiting`
per replica is the autoscaling signal).
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

# One family from the replicas and the ingress (merged by MergedMetrics: one HELP per family).
WAITING_HELP = (
    "Sequences queued for a slot; the ingress's: requests refused while no replica runs "
    "(scaled to zero), as the clients waiting for one."
)
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_LENGTH_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)


class ReplicaMetrics:
    """The metrics of one model replica; implements the scheduler's observer protocol."""

    def __init__(self, deployment: str, replica: str) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        labels = ("deployment", "replica")
        values = {"deployment": deployment, "replica": replica}

        def labelled(metric):
            return metric.labels(**values)

        reg = self.registry
        self.waiting = labelled(
            Gauge("grokserve_requests_waiting", WAITING_HELP, labels, registry=reg)
        )
        self.running = labelled(
            Gauge("grokserve_requests_running", "Sequences holding a slot.", labels, registry=reg)
        )
        self.kv_usage = labelled(
            Gauge(
                "grokserve_kv_cache_usage_ratio",
                "KV-cache blocks in use / KV-cache blocks (kvCacheTokens / 16).",
                labels,
                registry=reg,
            )
        )
        self.prefix_queries = labelled(
            Counter(
                "grokserve_prefix_cache_queries",
                "Prompt tokens looked up in the prefix cache (as vLLM counts them).",
                labels,
                registry=reg,
            )
        )
        self.prefix_hits = labelled(
            Counter(
                "grokserve_prefix_cache_hits",
                "Prompt tokens found in the prefix cache (not computed again).",
                labels,
                registry=reg,
            )
        )
        self.preemptions = labelled(
            Counter(
                "grokserve_preemptions",
                "Sequences preempted (to be recomputed) because the KV cache ran out of blocks.",
                labels,
                registry=reg,
            )
        )
        self.ttft = labelled(
            Histogram(
                "grokserve_time_to_first_token_seconds",
                "From the request's arrival at the API to its first generated token.",
                labels,
                buckets=_LATENCY_BUCKETS,
                registry=reg,
            )
        )
        self.itl = labelled(
            Histogram(
                "grokserve_inter_token_latency_seconds",
                "Between consecutive generated tokens of one sequence.",
                labels,
                buckets=_LATENCY_BUCKETS,
                registry=reg,
            )
        )
        self.decode_batch = labelled(
            Histogram(
                "grokserve_decode_batch_size",
                "Sequences in each decode step (the running batch).",
                labels,
                buckets=_BATCH_BUCKETS,
                registry=reg,
            )
        )
        self.queue_time = labelled(
            Histogram(
                "grokserve_request_queue_time_seconds",
                "From admission by the scheduler to a KV-cache slot (time spent waiting).",
                labels,
                buckets=_LATENCY_BUCKETS,
                registry=reg,
            )
        )
        self.e2e = labelled(
            Histogram(
                "grokserve_e2e_request_latency_seconds",
                "From the request's arrival at the API to its last token, per sequence.",
                labels,
                buckets=_LATENCY_BUCKETS,
                registry=reg,
            )
        )
        self.prompt_length = labelled(
            Histogram(
                "grokserve_request_prompt_tokens",
                "Prompt tokens of each finished sequence.",
                labels,
                buckets=_LENGTH_BUCKETS,
                registry=reg,
            )
        )
        self.generation_length = labelled(
            Histogram(
                "grokserve_request_generation_tokens",
                "Generated tokens of each finished sequence.",
                labels,
                buckets=_LENGTH_BUCKETS,
                registry=reg,
            )
        )
        self._finished = Counter(
            "grokserve_request_success",
            "Finished sequences by finish reason (stop, length, cancelled, error).",
            (*labels, "finish_reason"),
            registry=reg,
        )
        self.prompt_tokens = labelled(
            Counter("grokserve_prompt_tokens", "Prompt tokens prefilled.", labels, registry=reg)
        )
        self.generation_tokens = labelled(
            Counter("grokserve_generation_tokens", "Tokens generated.", labels, registry=reg)
        )
        self._experts = Counter(
            "grokserve_expert_tokens",
            "Tokens routed to each expert of each MoE layer.",
            (*labels, "layer", "expert"),
            registry=reg,
        )
        self._weights_fetched = Counter(
            "grokserve_weights_bytes_fetched",
            "Checkpoint bytes each shard fetched from its store so far (0 when served from the "
            "node cache or a local path).",
            (*labels, "rank"),
            registry=reg,
        )
        self._weights_done = Gauge(
            "grokserve_weights_bytes_done",
            "Bytes of each shard's share of the checkpoint in the node cache: found there when "
            "the load began, or fetched since; equals grokserve_weights_bytes_needed once fetched.",
            (*labels, "rank"),
            registry=reg,
        )
        self._weights_needed = Gauge(
            "grokserve_weights_bytes_needed",
            "Bytes of the checkpoint each shard's load needs (its rank's share), known once the "
            "shard has read the safetensors headers.",
            (*labels, "rank"),
            registry=reg,
        )
        self._weights_seconds = Gauge(
            "grokserve_weights_load_seconds",
            "Seconds each shard took to fetch and load its weights (set once the load is done).",
            (*labels, "rank"),
            registry=reg,
        )
        self._fetched_seen: dict[str, int] = {}  # rank -> bytes counted so far
        self._values = values
        self._expert_seen: list[list[int]] | None = None

    # -- SchedulerObserver --------------------------------------------------------------------

    def on_prompt(self, tokens: int, queued_seconds: float) -> None:
        self.prompt_tokens.inc(tokens)
        self.queue_time.observe(queued_seconds)

    def on_first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)
        self.generation_tokens.inc()

    def on_next_token(self, seconds: float) -> None:
        self.itl.observe(seconds)
        self.generation_tokens.inc()

    def on_finish(self, reason: str, seconds: float, prompt: int, generated: int) -> None:
        self._finished.labels(**self._values, finish_reason=reason).inc()
        self.e2e.observe(seconds)
        self.prompt_length.observe(prompt)
        self.generation_length.observe(generated)

    def on_decode_batch(self, size: int) -> None:
        self.decode_batch.observe(size)

    def on_state(self, waiting: int, running: int, kv_usage: float) -> None:
        self.waiting.set(waiting)
        self.running.set(running)
        self.kv_usage.set(kv_usage)

    def on_prefix_cache(self, queried_tokens: int, hit_tokens: int) -> None:
        self.prefix_queries.inc(queried_tokens)
        self.prefix_hits.inc(hit_tokens)

    def on_preemption(self) -> None:
        self.preemptions.inc()

    # -- expert routing -------------------------------------------------------------------------

    def record_expert_counts(self, counts: Sequence[Sequence[int]]) -> None:
        """Advance the per-(layer, expert) counters to the model's cumulative counts."""
        seen = self._expert_seen or [[0] * len(row) for row in counts]
        for layer, row in enumerate(counts):
            for expert, total in enumerate(row):
                if total > seen[layer][expert]:
                    self._experts.labels(**self._values, layer=str(layer), expert=str(expert)).inc(
                        total - seen[layer][expert]
                    )
        self._expert_seen = [list(row) for row in counts]

    def record_weights_load(self, shards: Sequence[Mapping[str, Any]]) -> None:
        """What each shard worker has of its weights (`describe()["weights"]`): polled while it
        loads, and once more when it is done (then with its load_seconds)."""
        for shard in shards:
            rank, weights = str(shard["rank"]), shard["weights"]
            labelled = {**self._values, "rank": rank}
            fetched = int(weights.get("fetched_bytes", 0))
            # A counter only grows: add what arrived since the last report.
            self._weights_fetched.labels(**labelled).inc(
                max(0, fetched - self._fetched_seen.get(rank, 0))
            )
            self._fetched_seen[rank] = max(fetched, self._fetched_seen.get(rank, 0))
            if "needed_bytes" in weights:
                self._weights_done.labels(**labelled).set(weights["done_bytes"])
                self._weights_needed.labels(**labelled).set(weights["needed_bytes"])
            if "load_seconds" in weights:
                self._weights_seconds.labels(**labelled).set(weights["load_seconds"])

    def snapshot(self) -> list[Metric]:
        return list(self.registry.collect())


class MergedMetrics(Collector):
    """Families from several replicas' snapshots merged by name (one HELP/TYPE per family), with
    snapshots older than `expire_seconds` dropped so a dead replica's series disappear."""

    def __init__(self, expire_seconds: float = 30.0) -> None:
        self._snapshots: dict[str, tuple[float, list[Metric]]] = {}
        self._expire_seconds = expire_seconds
        self._registry = CollectorRegistry(auto_describe=False)
        self._registry.register(self)

    def update(self, replica: str, families: list[Metric]) -> None:
        self._snapshots[replica] = (time.monotonic(), families)

    def collect(self) -> Iterable[Metric]:
        return self._merged(())

    def _merged(self, extra: Sequence[Metric]) -> list[Metric]:
        deadline = time.monotonic() - self._expire_seconds
        merged: dict[str, Metric] = {}
        live: list[Metric] = []
        for replica, (updated, families) in list(self._snapshots.items()):
            if updated < deadline:
                del self._snapshots[replica]
                continue
            live.extend(families)
        for family in [*live, *extra]:
            target = merged.get(family.name)
            if target is None:
                target = Metric(family.name, family.documentation, family.type, family.unit)
                merged[family.name] = target
            target.samples.extend(family.samples)
        return list(merged.values())

    def render(self, extra: Sequence[Metric] = ()) -> bytes:
        """The exposition of every live snapshot, with `extra` (the caller's own families, e.g.
        the ingress's waiting demand) merged in: one HELP/TYPE per family name."""
        if not extra:
            return generate_latest(self._registry)
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Families(self._merged(extra)))
        return generate_latest(registry)


class _Families(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterable[Metric]:
        return self._families


class ZeroDemand:
    """Requests the ingress refused because no model replica runs (scaled to zero), exported as
    `grokserve_requests_waiting` of the ingress replica: the autoscaler's queue signal, so a
    request at zero wakes the deployment (the operator's policy scales 0 -> 1 when it is > 0).

    Clients retry after `retry_after_seconds`, so one waiting client is refused about
    `window_seconds / retry_after_seconds` times per window: the refusals of the last window times
    retry_after / window estimate the clients waiting (Little's law), at least 1 while any
    refusal is that recent. The window outlasts a Prometheus scrape and an autoscaler period.
    """

    def __init__(
        self,
        deployment: str,
        replica: str,
        retry_after_seconds: float,
        window_seconds: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._retry_after_seconds = retry_after_seconds
        self._window_seconds = window_seconds
        self._clock = clock
        self._refused: deque[float] = deque()
        self.registry = CollectorRegistry(auto_describe=True)
        Gauge(
            "grokserve_requests_waiting",
            WAITING_HELP,
            ("deployment", "replica"),
            registry=self.registry,
        ).labels(deployment=deployment, replica=replica).set_function(self.waiting)

    def refused(self) -> None:
        self._refused.append(self._clock())

    def waiting(self) -> int:
        oldest = self._clock() - self._window_seconds
        while self._refused and self._refused[0] < oldest:
            self._refused.popleft()
        return math.ceil(len(self._refused) * self._retry_after_seconds / self._window_seconds)

    def snapshot(self) -> list[Metric]:
        return list(self.registry.collect())


class RequestMetrics:
    """The API's own counts (the ingress): HTTP requests by route and status class, including
    those refused before reaching a replica (429, 4xx, 5xx) and the ones the client cancelled."""

    def __init__(self, deployment: str, body_bytes_in_flight: Callable[[], float]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._deployment = deployment
        Gauge(
            "grokserve_ingress_body_bytes_in_flight",
            "Request-body bytes this ingress replica holds (being read or not yet answered), "
            "bounded by maxRequestBytesInFlight.",
            ("deployment",),
            registry=self.registry,
        ).labels(deployment=deployment).set_function(body_bytes_in_flight)
        self._requests = Counter(
            "grokserve_http_requests",
            "HTTP requests to the generation routes by status (200, 429, 4xx, 5xx, cancelled).",
            ("deployment", "route", "status"),
            registry=self.registry,
        )

    def on_response(self, route: str, status: int | str, count: int = 1) -> None:
        """`count` answers of `status` on `route` (several: those Serve's proxy reports at once)."""
        if isinstance(status, int) and status not in (200, 413, 429, 503):
            status = f"{status // 100}xx"
        labels = self._requests.labels(deployment=self._deployment, route=route, status=str(status))
        labels.inc(count)

    def render(self) -> bytes:
        return generate_latest(self.registry)
