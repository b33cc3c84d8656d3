"""`grokserve serve` flags -> ServingConfig, and bad flags fail before anything starts."""

import argparse

import httpx
import pytest

from grokserve.commands import serve
from testkit.serving import ServeProcess


def parse(*argv):
    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    return parser.parse_args(argv)


def test_flags_become_the_serving_config():
    from grokserve.serving.launcher import ClusterShape

    args = parse("--preset", "grok-tiny", "--nodes", "2", "--gpus-per-node", "2", "--port", "9000")
    config = ClusterShape(args.nodes, args.gpus_per_node).apply(serve.serving_config(args))
    assert config.name == "grok-tiny" and config.model.preset == "grok-tiny"
    assert config.parallelism.shards == 4
    assert config.resources.accelerator_resource == "simulated_gpu"
    assert args.host == "127.0.0.1" and args.port == 9000


def test_checkpoint_tokenizer_and_cache_dir_reach_the_model_spec():
    args = parse(
        "--checkpoint", "s3://b/grok", "--tokenizer", "hf://o/r/t.model", "--cache-dir", "/c"
    )
    model = serve.serving_config(args).model
    assert (model.source, model.tokenizer, model.cache_dir) == (
        "s3://b/grok",
        "hf://o/r/t.model",
        "/c",
    )
    assert (
        serve.serving_config(parse("--preset", "grok-tiny", "--cache-dir", "/c")).model.cache_dir
        == "/c"
    )


def test_the_local_cluster_fits_every_replica():
    from grokserve.serving.launcher import ClusterShape

    def cluster(*flags):
        args = parse("--preset", "grok-tiny", *flags)
        shape = ClusterShape(args.nodes, args.gpus_per_node)
        config = shape.apply(serve.serving_config(args))
        return config, shape.worker_nodes(config)

    config, [node] = cluster("--replicas", "3")
    needed = 3 * sum(bundle["CPU"] for bundle in config.placement_group_bundles())
    assert node.num_cpus >= needed

    config, nodes = cluster("--replicas", "3", "--nodes", "2", "--gpus-per-node", "2")
    assert sum(node.resources["simulated_gpu"] for node in nodes) == 3 * 4
    assert sum(node.num_cpus for node in nodes) >= 3 * sum(
        bundle["CPU"] for bundle in config.placement_group_bundles()
    )


def test_bad_flags_exit_2_naming_the_setting(capsys):
    assert serve.run(parse("--max-batch-size", "0")) == 2
    assert "maxBatchSize" in capsys.readouterr().err
    assert serve.run(parse("--nodes", "2", "--gpus-per-node", "2", "--tensor", "3")) == 2
    assert "tensor 3 must divide the 4 GPUs" in capsys.readouterr().err


def test_readme_command_serves_the_demo_and_stops_on_ctrl_c(tmp_path):
    """`grokserve serve` as the README runs it: the shipped demo model answers, Ctrl-C exits 0."""
    server = ServeProcess(tmp_path)
    try:
        server.wait_serving(timeout_s=240)
        assert _answers(f"{server.url}/readyz")
        request = {"model": "grok-demo", "prompt": "Return the", "max_tokens": 16}
        reply = httpx.post(f"{server.url}/v1/completions", json=request, timeout=60)
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["text"].strip()
        unknown = httpx.post(f"{server.url}/v1/completions", json={**request, "model": "gpt-4"})
        assert unknown.status_code == 404 and "grok-demo" in unknown.text
        assert server.ctrl_c(timeout_s=120) == 0
        assert "shutting down" in server.log.read_text()
    finally:
        server.kill()


@pytest.mark.slow
def test_serve_is_ready_when_every_replica_runs(tmp_path):
    """With --replicas 3, 'serving' is printed once all three replicas answer."""
    server = ServeProcess(tmp_path, "--preset", "grok-tiny", "--replicas", "3")
    try:
        server.wait_serving(timeout_s=200)
        readyz = f"{server.url}/readyz"
        replicas = {httpx.get(readyz, timeout=30).json()["replica"] for _ in range(60)}
        assert len(replicas) == 3
        assert server.ctrl_c(timeout_s=60) == 0
    finally:
        server.kill()


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
