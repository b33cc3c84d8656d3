"""Shard workers: G Ray actors per replica, one per placement-group bundle, one model shard each.

G = 1 and G > 1 take the same path: the replica creates the workers in its own placement group
(bundle i holds rank i), they join one torch.distributed group (gloo on CPU, NCCL on CUDA) when G > 1,
and every step is sent to all of them with identical inputs; rank 0's sampled tokens are the answer.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import ray
from ray.util.placement_group import get_current_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from grokserve.serving.config import ServingConfig
from grokserve.serving.scheduler import RowOutput, StepInput

if TYPE_CHECKING:
    from grokserve.serving.executor import ModelStepper


# While load() holds the worker's default thread, weights_progress() answers from a thread of
# its own; steps keep the one default thread, so they still run one at a time in call order.
PROGRESS_GROUP = "progress"
PROGRESS_POLL_SECONDS = 1.0


# Ray's typed overloads of ray.remote leave out its documented concurrency_groups option.
@ray.remote(concurrency_groups={PROGRESS_GROUP: 1})  # type: ignore[call-overload]
class ShardWorker:
    def __init__(self, args: dict[str, Any], rank: int) -> None:
        self.config = ServingConfig.from_args(args)
        self.rank = rank
        self.stepper: ModelStepper | None = None  # set by load()
        # Replaced whole, never changed in place: the progress thread reads it during load().
        self.weights: dict[str, float] = {}

    def rendezvous_address(self) -> tuple[str, int]:
        """Rank 0's node address and a free port on it, for torch.distributed to meet at."""
        with socket.socket() as probe:
            probe.bind(("", 0))
            port = probe.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def load(self, master: tuple[str, int]) -> dict[str, Any]:
        import torch

        from grokserve.serving.executor import ModelStepper
        from grokserve.serving.loading import load_shard

        torch.set_num_threads(max(1, int(self.config.resources.cpus_per_shard)))
        started = time.perf_counter()
        found: int | None = None  # bytes of the share the cache held before this load

        def progress(done: int, needed: int) -> None:
            nonlocal found
            found = done if found is None else found
            self.weights = {
                **self.weights,
                "done_bytes": done,
                "needed_bytes": needed,
                "fetched_bytes": done - found,
            }

        def fetched(weights: Any) -> None:
            self.weights = {
                **self.weights,
                "done_bytes": weights.needed_bytes,
                "fetched_bytes": weights.fetched_bytes,  # headers read before the share included
                "needed_bytes": weights.needed_bytes,
                "total_bytes": weights.total_bytes,
            }

        model = load_shard(self.config, self.rank, master, on_fetched=fetched, on_progress=progress)
        self.weights = {**self.weights, "load_seconds": time.perf_counter() - started}
        self.stepper = ModelStepper.for_config(model, self.config)
        return self.describe()

    def describe(self) -> dict[str, Any]:
        context = ray.get_runtime_context()
        return {
            "rank": self.rank,
            "node_id": context.get_node_id(),
            "node_ip": ray.util.get_node_ip_address(),
            "pid": os.getpid(),
            "resources": context.get_assigned_resources(),
            "weights": self.weights,
        }

    @ray.method(concurrency_group=PROGRESS_GROUP)
    def weights_progress(self) -> dict[str, Any]:
        """What describe() says of the weights, answered also while load() runs."""
        return {"rank": self.rank, "weights": self.weights}

    def step(self, step: StepInput) -> list[RowOutput]:
        return self.loaded().run(step)

    def expert_token_counts(self) -> list[list[int]] | None:
        return self.loaded().expert_token_counts()

    def loaded(self) -> ModelStepper:
        if self.stepper is None:
            raise RuntimeError(f"shard worker {self.rank} was asked to step before load()")
        return self.stepper


class ShardedExecutor:
    """The scheduler's executor for one replica: fans each step out to the G shard workers."""

    def __init__(self, workers: list[Any], shards: list[dict[str, Any]]) -> None:
        self.workers = workers
        self.shards = shards

    @classmethod
    async def create(
        cls,
        config: ServingConfig,
        on_progress: Callable[[list[dict[str, Any]]], Awaitable[None]] | None = None,
    ) -> ShardedExecutor:
        """G shard workers with their weights loaded; while they load, `on_progress` hears every
        PROGRESS_POLL_SECONDS what each has of its weights so far (their `weights_progress()`)."""
        group = get_current_placement_group()
        resources = config.resources
        workers = []
        for rank in range(config.parallelism.shards):
            options: dict[str, Any] = {"num_cpus": resources.cpus_per_shard}
            if resources.accelerator_resource == "GPU":
                options["num_gpus"] = 1
            elif resources.accelerator_resource:
                options["resources"] = {resources.accelerator_resource: 1}
            if group is not None:
                options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                    group, placement_group_bundle_index=rank
                )
            # @ray.remote makes the class an ActorClass, which Ray's annotations do not say.
            actor = ShardWorker.options(**options)  # type: ignore[attr-defined]
            workers.append(actor.remote(config.to_args(), rank))
        master = await workers[0].rendezvous_address.remote()
        loads = asyncio.gather(*(w.load.remote(master) for w in workers))
        while on_progress is not None:
            finished, _ = await asyncio.wait({loads}, timeout=PROGRESS_POLL_SECONDS)
            if finished:
                break
            try:
                progress = await asyncio.gather(*(w.weights_progress.remote() for w in workers))
            except ray.exceptions.RayActorError:
                break  # a worker died: its load fails too, with the cause, awaited below
            await on_progress(list(progress))
        return cls(workers, list(await loads))

    def submit(self, step: StepInput) -> Awaitable[list[RowOutput]]:
        # .remote() queues the step on every worker now, in call order.
        return self._rank0(*(worker.step.remote(step) for worker in self.workers))

    @staticmethod
    async def _rank0(*results: Any) -> list[RowOutput]:
        return (await asyncio.gather(*results))[0]

    async def expert_token_counts(self) -> list[list[int]] | None:
        # The router runs on every rank with identical inputs, so rank 0 has the full counts.
        return await self.workers[0].expert_token_counts.remote()

    async def check(self, timeout_s: float) -> None:
        """Raises unless every shard worker answers within `timeout_s`."""
        await asyncio.wait_for(
            asyncio.gather(*(w.describe.remote() for w in self.workers)), timeout=timeout_s
        )

    def close(self) -> None:
        for worker in self.workers:
            ray.kill(worker)
