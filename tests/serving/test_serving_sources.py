"""`grokserve serve --checkpoint s3://... --cache-dir DIR`: the demo checkpoint from moto's S3 server
serves what the shipped demo serves, and again with the store gone, from the node cache."""

import httpx
import pytest
import torch

from grokserve.model.checkpoint import open_checkpoint
from grokserve.model.sampling import SamplingParams, generate
from grokserve.serving.config import ServingConfig
from grokserve.serving.loading import (
    DEMO_CHECKPOINT,
    load_shard,
    load_tokenizer,
    metadata_path,
)
from testkit.serving import ServeProcess
from testkit.stores import HubStandIn, fake_gcs, files_of, moto_s3, upload_gcs, upload_s3

PROMPT, MAX_TOKENS = "Return the", 16


def demo_greedy_completion(source: str = str(DEMO_CHECKPOINT), cache=None) -> str:
    """What a replica serving `source` completes greedily, computed here without Ray."""
    config = ServingConfig(model={"source": source, "cacheDir": cache and str(cache)})
    tokenizer = load_tokenizer(config.model)
    with torch.no_grad():
        model = load_shard(config, rank=0, master=("127.0.0.1", 0))
        ids = generate(
            model, tokenizer.encode(PROMPT), SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
        )
    return tokenizer.decode(ids).lstrip()  # the API keeps the first piece's leading space


def completion(server: ServeProcess) -> str:
    request = {"model": "grok", "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0}
    reply = httpx.post(f"{server.url}/v1/completions", json=request, timeout=60)
    assert reply.status_code == 200, reply.text
    return reply.json()["choices"][0]["text"].lstrip()


def serve_once(tmp_path, name: str, cache) -> str:
    folder = tmp_path / name
    folder.mkdir()
    server = ServeProcess(folder, "--checkpoint", "s3://weights/demo", "--cache-dir", str(cache))
    try:
        server.wait_serving(timeout_s=240)
        text = completion(server)
        metrics = httpx.get(f"{server.url}/metrics", timeout=30).text
        assert 'grokserve_weights_bytes_fetched_total{deployment="grok"' in metrics
        assert 'grokserve_weights_load_seconds{deployment="grok"' in metrics
        assert server.ctrl_c(timeout_s=120) == 0
        return text
    finally:
        server.kill()


@pytest.fixture(scope="module")
def expected() -> str:
    return demo_greedy_completion()


@pytest.mark.slow
def test_serve_from_s3_then_from_the_cache_with_the_store_gone(tmp_path, expected):
    cache = tmp_path / "cache"
    with moto_s3() as store:
        upload_s3(DEMO_CHECKPOINT, "weights", "demo")
        cold = serve_once(tmp_path, "cold", cache)
        assert cold == expected
        store.stop()
        offline = serve_once(tmp_path, "offline", cache)
        assert offline == expected
    complete = cache / "s3" / "weights" / "demo" / "complete"
    assert sorted(p.name for p in complete.iterdir()) == sorted(
        p.name for p in DEMO_CHECKPOINT.iterdir()
    )


def test_each_shards_fetched_bytes_and_load_time_are_metrics():
    from prometheus_client import generate_latest

    from grokserve.serving.metrics import ReplicaMetrics

    metrics = ReplicaMetrics("grok", "r0")
    metrics.record_weights_load(
        [
            {"rank": 0, "weights": {"fetched_bytes": 1234, "load_seconds": 1.5}},
            {"rank": 1, "weights": {"load_seconds": 2.0}},  # random preset weights: no fetch
        ]
    )
    text = generate_latest(metrics.registry).decode()
    labels = 'deployment="grok",rank="{}",replica="r0"'
    assert f"grokserve_weights_bytes_fetched_total{{{labels.format(0)}}} 1234.0" in text
    assert f"grokserve_weights_bytes_fetched_total{{{labels.format(1)}}} 0.0" in text
    assert f"grokserve_weights_load_seconds{{{labels.format(1)}}} 2.0" in text


@pytest.mark.parametrize("scheme", ["gs", "hf"])
def test_a_replica_loads_gs_and_hf_sources_then_serves_them_from_the_cache(
    tmp_path, scheme, expected
):
    if scheme == "gs":
        store, url = fake_gcs(), "gs://weights/demo"
    else:
        store, url = HubStandIn("org/demo", files_of(DEMO_CHECKPOINT)), "hf://org/demo"
    with store as server:
        if scheme == "gs":
            upload_gcs(DEMO_CHECKPOINT, "weights", "demo")
        assert demo_greedy_completion(url, tmp_path) == expected
        server.stop()
        # A fresh process fetches the metadata again: with the store gone, from the cache.
        metadata_path.cache_clear()
        assert demo_greedy_completion(url, tmp_path) == expected


def test_serve_refuses_a_bad_location_in_one_line_before_ray_starts(tmp_path, capsys):
    import argparse

    from grokserve.commands import serve

    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    with moto_s3():
        upload_s3(DEMO_CHECKPOINT, "weights", "demo")
        args = parser.parse_args(["--checkpoint", "s3://absent/demo", "--cache-dir", str(tmp_path)])
        assert serve.run(args) == 2
    assert capsys.readouterr().err.strip() == (
        "grokserve serve: invalid settings: s3://absent/demo: bucket 'absent' does not exist"
    )


def test_each_shard_worker_of_an_expert_parallel_replica_fetches_its_share(tmp_path):
    from grokserve.serving.loading import fetch_shard_weights, placement_plan

    with moto_s3():
        upload_s3(DEMO_CHECKPOINT, "weights", "demo")
        config = ServingConfig(
            model={"source": "s3://weights/demo", "cacheDir": str(tmp_path / "replica")},
            parallelism={"gpusPerNode": 4, "tensor": 1, "expert": 4},
        )
        plan = placement_plan(config)
        fetched = [
            fetch_shard_weights(
                config.model.model_copy(update={"cache_dir": str(tmp_path / f"node{r}")}), plan, r
            )
            for r in range(4)
        ]
    demo = open_checkpoint(DEMO_CHECKPOINT)
    experts = sum(demo.info(n).nbytes for n in demo.names() if ".moe.w_" in n)
    # Every byte (embeddings, attention, tokenizer, headers) but three quarters of the experts'.
    assert [f.fetched_bytes for f in fetched] == [fetched[0].total_bytes - experts * 3 // 4] * 4
