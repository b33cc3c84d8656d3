"""While a replica loads its weights, `GET /metrics` already shows each shard's bytes done of the
bytes it needs, growing as they arrive (what the operator turns into the Loading status)."""

from __future__ import annotations

import time

import httpx
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from grokserve.serving.loading import DEMO_CHECKPOINT
from grokserve.serving.metrics import ReplicaMetrics
from testkit.serving import ServeProcess
from testkit.stores import HubStandIn, files_of

LABELS = 'deployment="grok",rank="0",replica="r0"'


def test_polled_progress_then_the_finished_load_are_one_set_of_series():
    metrics = ReplicaMetrics("grok", "r0")

    def sample(name: str) -> float | None:
        text = generate_latest(metrics.registry).decode()
        line = next((x for x in text.splitlines() if x.startswith(f"{name}{{{LABELS}}} ")), None)
        return None if line is None else float(line.split()[-1])

    def report(**weights: float) -> None:
        metrics.record_weights_load([{"rank": 0, "weights": weights}])

    report()  # the shard has not read its headers yet: nothing to say but 0 fetched
    assert sample("grokserve_weights_bytes_needed") is None
    # 300 of the 1000 bytes it needs were in the node cache; 200 fetched since.
    report(done_bytes=500, needed_bytes=1000, fetched_bytes=200)
    assert (sample("grokserve_weights_bytes_done"), sample("grokserve_weights_bytes_needed")) == (
        500,
        1000,
    )
    assert sample("grokserve_weights_bytes_fetched_total") == 200
    assert sample("grokserve_weights_load_seconds") is None  # not loaded yet
    # Done: the fetch's own count (headers included) and the load's time.
    report(done_bytes=1000, needed_bytes=1000, fetched_bytes=750, load_seconds=2.5)
    assert sample("grokserve_weights_bytes_done") == 1000
    assert sample("grokserve_weights_bytes_fetched_total") == 750
    assert sample("grokserve_weights_load_seconds") == 2.5


def shard_progress(url: str) -> dict[str, tuple[float, float]] | None:
    """rank -> (bytes done, bytes needed) as /metrics shows them now; None if it does not answer."""
    try:
        reply = httpx.get(f"{url}/metrics", timeout=5)
    except httpx.HTTPError:
        return None
    if reply.status_code != 200:
        return None
    values: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(reply.text):
        for sample in family.samples:
            if sample.name in ("grokserve_weights_bytes_done", "grokserve_weights_bytes_needed"):
                values[sample.name, sample.labels["rank"]] = sample.value
    ranks = {rank for _, rank in values}
    return {
        rank: (
            values.get(("grokserve_weights_bytes_done", rank), 0.0),
            values.get(("grokserve_weights_bytes_needed", rank), 0.0),
        )
        for rank in ranks
    }


@pytest.mark.slow
def test_metrics_show_the_bytes_arriving_before_the_replica_is_ready(tmp_path):
    # Two shards, so each fetches its own share on the workers (the CLI fetches only the
    # metadata); a slow store, so the share arrives over seconds.
    store = HubStandIn("org/demo", files_of(DEMO_CHECKPOINT), read_delay_s=0.5)
    with store:
        server = ServeProcess(
            tmp_path,
            *("--checkpoint", "hf://org/demo", "--cache-dir", str(tmp_path / "cache")),
            *("--nodes", "1", "--gpus-per-node", "2", "--tensor", "1", "--expert", "2"),
        )
        try:
            seen: list[dict[str, tuple[float, float]]] = []
            deadline = time.monotonic() + 240
            while "Ctrl-C to stop" not in server.log.read_text():
                assert server.process.poll() is None, server.log.read_text()
                assert time.monotonic() < deadline, server.log.read_text()
                progress = shard_progress(server.url)
                if progress:
                    seen.append(progress)
                time.sleep(0.2)
            final = shard_progress(server.url)
        finally:
            server.kill()
    assert final is not None and sorted(final) == ["0", "1"]
    assert all(done == needed > 0 for done, needed in final.values()), final
    loading = [p for p in seen if any(done < needed for done, needed in p.values())]
    assert loading, f"no report while the shards fetched: {seen}"
    # The total is known from the start, and the bytes done grow toward it.
    totals = {rank: needed for p in seen for rank, (_, needed) in p.items()}
    assert totals == {rank: needed for rank, (_, needed) in final.items()}
    done_sums = [sum(done for done, _ in p.values()) for p in loading]
    assert len(set(done_sums)) >= 2 and done_sums == sorted(done_sums), done_sums
