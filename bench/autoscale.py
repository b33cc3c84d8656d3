"""Reaction time of the built-in autoscaler: from a step change in queue depth to the `/scale` write.

Real parts: a prometheus-client exporter whose queue gauge steps between 0 and a burst, a real
Prometheus scraping it every second, and the autoscaler daemon in kopf against KMock. Steps alternate
up (1 → 4 replicas) and down (4 → 1, scale-down window 0 so that only the pipeline is measured) at a
random phase against the evaluation timer. Prints each step, the median and max next to the configured
intervals, and the ratio to the target bound (scrape interval + evaluation interval + 1 s).

    PYTHONSAFEPATH=1 python bench/autoscale.py --steps 8 --evaluation-interval 5
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import time
from pathlib import Path

# The harness lives with the tests (tests/testkit); the benchmark reuses it rather than copying it.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from testkit.autoscaling import (
    RESOURCE,
    QueueExporter,
    create_grok_deployment,
    grokserve_api,
    running_operator,
    scraping,
    wait_until,
)
from testkit.prometheus import TestExporter

NAMESPACE, NAME = "bench", "grok-1"
TARGET_PER_REPLICA, BURST, MAX_REPLICAS = 8, 30, 4  # ceil(30 / 8) = 4


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=8, help="queue steps to time (default 8)")
    parser.add_argument(
        "--evaluation-interval",
        type=int,
        default=5,
        help="autoscaling.evaluationIntervalSeconds (the spec allows >= 5; default 5)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the step phases")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    if args.evaluation_interval < 5:
        parser.error(
            f"--evaluation-interval must be >= 5 (the CRD's minimum), got {args.evaluation_interval}"
        )
    return args


async def measure(steps: int, evaluation_s: int, seed: int) -> tuple[float, list[float]]:
    phases = random.Random(seed)
    with TestExporter() as exporter, scraping(exporter, NAMESPACE) as prometheus:
        queue = QueueExporter(exporter, (NAME,))
        prometheus.wait_for_targets_up(timeout_s=20)
        async with grokserve_api() as api:
            await create_grok_deployment(
                api,
                NAMESPACE,
                NAME,
                replicas=1,
                autoscaling={
                    "minReplicas": 1,
                    "maxReplicas": MAX_REPLICAS,
                    "prometheusUrl": prometheus.url,
                    "targetQueuePerReplica": TARGET_PER_REPLICA,
                    "scaleDownStabilizationSeconds": 0,
                    "scaleUpLimit": MAX_REPLICAS,
                    "scaleDownLimit": MAX_REPLICAS,
                    "evaluationIntervalSeconds": evaluation_s,
                },
            )
            async with running_operator(api):
                await wait_until(
                    "a first evaluation",
                    lambda: (
                        "autoscaling"
                        in api.objects[RESOURCE, NAMESPACE, NAME].raw.get("status", {})
                    ),
                    timeout_s=15,
                )
                latencies = []
                for step in range(steps):
                    await asyncio.sleep(phases.uniform(0, evaluation_s))
                    writes = len(api.scale_writes)
                    up = step % 2 == 0
                    started = time.monotonic()
                    queue.set(
                        NAME, waiting=BURST if up else 0, running=TARGET_PER_REPLICA if up else 0
                    )
                    await wait_until(
                        f"step {step}: /scale write",
                        lambda writes=writes: len(api.scale_writes) > writes,
                        timeout_s=3 * (prometheus.interval_s + evaluation_s),
                    )
                    written_at, _, replicas = api.scale_writes[writes]
                    latencies.append(written_at - started)
                    print(
                        f"step {step:2d} {'up  ' if up else 'down'} -> {replicas} replicas: "
                        f"{latencies[-1]:.2f} s",
                        flush=True,
                    )
        return prometheus.interval_s, latencies


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    scrape_s, latencies = asyncio.run(measure(args.steps, args.evaluation_interval, args.seed))
    bound = scrape_s + args.evaluation_interval + 1.0
    median, worst = statistics.median(latencies), max(latencies)
    print(
        f"scrape interval {scrape_s:g} s, evaluation interval {args.evaluation_interval} s, "
        f"bound (scrape + evaluation + 1 s) {bound:g} s, {len(latencies)} steps"
    )
    print(f"step -> /scale write: median {median:.2f} s, max {worst:.2f} s")
    print(
        f"ratio to bound: median {median / bound:.2f}, max {worst / bound:.2f} "
        f"({'within' if worst <= bound else 'OVER'} the bound)"
    )
    return 0 if worst <= bound else 1


if __name__ == "__main__":
    raise SystemExit(main())
