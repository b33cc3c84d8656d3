"""The model replica deployment (scheduler + shard workers) and the metrics hub deployment."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from prometheus_client.metrics_core import Metric
from ray import serve
from ray.serve.handle import DeploymentHandle

from grokserve.serving.config import ServingConfig
from grokserve.serving.metrics import MergedMetrics, ReplicaMetrics
from grokserve.serving.requests import GenerateRequest
from grokserve.serving.scheduler import AdmissionError
from grokserve.serving.workers import ShardedExecutor

log = logging.getLogger(__name__)

METRICS_PUSH_SECONDS = 1.0
PUSH_TIMEOUT_SECONDS = 5.0
HEALTH_TIMEOUT_SECONDS = 20.0


class GrokReplica:
    """One model instance: G shard workers in this replica's placement group, one scheduler."""

    # Ray Serve awaits an async constructor; Python's typing knows only a synchronous __init__.
    async def __init__(self, args: dict[str, Any], metrics_hub: DeploymentHandle) -> None:  # type: ignore[misc]
        # loading imports torch: only the replica process needs it, not the ingress or the hub.
        from grokserve.serving.loading import build_engine

        self.config = ServingConfig.from_args(args)
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.metrics = ReplicaMetrics(self.config.name, self.replica_id)
        self._metrics_hub = metrics_hub
        self.executor = await ShardedExecutor.create(self.config, self._loading)
        self.metrics.record_weights_load(self.executor.shards)
        self.engine = build_engine(self.config, self.executor, observer=self.metrics)
        self.scheduler = self.engine.scheduler
        self.scheduler.start()
        self._push_task = asyncio.get_running_loop().create_task(self._push_metrics())

    async def generate(self, request: GenerateRequest) -> AsyncIterator[dict[str, Any]]:
        async for event in self.engine.generate(request):
            yield event

    async def ready(self) -> dict[str, Any]:
        if self.scheduler.broken:
            raise RuntimeError("a model step failed; this replica is being replaced")
        return {"replica": self.replica_id, "shards": len(self.executor.workers)}

    # vLLM's tokenizer routes (the ingress adds the context length).

    async def tokenize(self, text: str, add_special_tokens: bool) -> dict[str, Any]:
        try:
            tokens = await self.engine.encode(text)
        except AdmissionError as error:
            return {"error": {"message": str(error), "param": error.param}}
        if add_special_tokens:
            tokens = [self.engine.special.bos, *tokens]
        return {"tokens": tokens, "count": len(tokens), "token_strs": None}

    async def detokenize(self, tokens: list[int]) -> dict[str, Any]:
        try:
            await self.engine.prompt_ids(tokens)  # the ids' range
        except AdmissionError as error:
            return {"error": {"message": str(error), "param": "tokens"}}
        return {"prompt": self.engine.decode(tokens)}

    async def tokenizer_info(self) -> dict[str, Any]:
        return self.engine.tokenizer_info()

    async def placement(self) -> dict[str, Any]:
        from grokserve.serving.loading import describe_plan, placement_plan

        return {
            "deployment": self.config.name,
            "replica": self.replica_id,
            "strategy": self.config.parallelism.strategy,
            "shards": self.executor.shards,
            "nodes": len({shard["node_id"] for shard in self.executor.shards}),
            "plan": describe_plan(placement_plan(self.config)),
        }

    async def check_health(self) -> None:
        """Serve replaces this replica when this raises: its engine loop or a shard worker died."""
        if not self.scheduler.alive:
            raise RuntimeError("the scheduler's engine loop has stopped")
        if self.scheduler.broken:
            raise RuntimeError("a model step failed (a shard worker died?)")
        await self.executor.check(timeout_s=HEALTH_TIMEOUT_SECONDS)

    async def _loading(self, shards: list[dict[str, Any]]) -> None:
        """The shard workers' weights so far, on /metrics while this replica is not ready yet
        (the operator's Loading status reads them from Prometheus)."""
        self.metrics.record_weights_load(shards)
        await self._push()

    async def _push_metrics(self) -> None:
        while True:
            try:
                counts = await self.executor.expert_token_counts()
                if counts is not None:
                    self.metrics.record_expert_counts(counts)
            except Exception:
                log.warning("reading the expert counts failed; retrying", exc_info=True)
            await self._push()
            await asyncio.sleep(METRICS_PUSH_SECONDS)

    async def _push(self) -> None:
        # Bounded: while the replica loads, a hub that does not answer must not hold up the load.
        try:
            await asyncio.wait_for(
                self._metrics_hub.push.remote(self.replica_id, self.metrics.snapshot()),
                timeout=PUSH_TIMEOUT_SECONDS,
            )
        except Exception:
            log.warning("pushing metrics failed; retrying", exc_info=True)

    async def __del__(self) -> None:
        self._push_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._push_task
        await self.scheduler.stop()
        self.executor.close()


class MetricsHub:
    """Holds the latest metrics snapshot of every replica; the ingress renders them at /metrics."""

    def __init__(self) -> None:
        self.merged = MergedMetrics(expire_seconds=30 * METRICS_PUSH_SECONDS)

    def push(self, replica: str, families: list[Metric]) -> None:
        self.merged.update(replica, families)

    def render(self, extra: list[Metric] | None = None) -> bytes:
        """Every replica's latest snapshot, with the caller's `extra` families merged in."""
        return self.merged.render(extra or ())
