"""`grokserve serve` flags -> ServingConfig, and bad flags fail before anything starts."""

import argparse
import os
import shutil
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from grokserve.commands import serve
from testkit.serving import free_port


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


class ServeProcess:
    """`grokserve serve FLAGS` as a user runs it, its output in a log file."""

    def __init__(self, tmp_path, *flags):
        executable = shutil.which("grokserve")
        assert executable, "the grokserve console script is not installed (pip install -e .)"
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.log = tmp_path / "serve.log"
        environment = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        with self.log.open("w") as output:
            self.process = subprocess.Popen(
                [executable, "serve", "--port", str(port), *flags],
                env={**environment, "PYTHONUNBUFFERED": "1"},
                stdout=output,
                stderr=subprocess.STDOUT,
            )

    def wait_serving(self, timeout_s: float) -> None:
        """Until it says Ctrl-C stops it: from then on, Ctrl-C is a clean stop."""
        deadline = time.monotonic() + timeout_s
        while "Ctrl-C to stop" not in self.log.read_text():
            assert self.process.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, (
                f"not serving in {timeout_s} s:\n{self.log.read_text()}"
            )
            time.sleep(0.5)

    def ctrl_c(self, timeout_s: float) -> int:
        self.process.send_signal(signal.SIGINT)
        return self.process.wait(timeout=timeout_s)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


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


def _histogram_count(metrics: str, name: str, le: str | None = None) -> float:
    wanted = f"{name}_bucket{{" if le else f"{name}_count{{"
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith(wanted) and (le is None or f'le="{le}"' in line)
    )


@pytest.mark.slow
def test_a_kv_budget_of_four_max_len_rows_runs_32_requests_at_once(tmp_path):
    """Paged KV cache end to end: 2048 cache tokens hold 32 short sequences at once (max_len rows
    would hold 4), each answering what it answers alone; a repeated long prompt hits the cache."""
    flags = ("--preset", "grok-tiny", "--max-batch-size", "64", "--max-sequence-length", "512")
    server = ServeProcess(tmp_path, *flags, "--kv-cache-tokens", "2048")
    try:
        server.wait_serving(timeout_s=240)

        def complete(http: httpx.Client, prompt: str, max_tokens: int = 12) -> str:
            body = {"model": "grok-tiny", "prompt": prompt, "max_tokens": max_tokens}
            reply = http.post("/v1/completions", json={**body, "temperature": 0})
            assert reply.status_code == 200, reply.text
            return reply.json()["choices"][0]["text"]

        prompts = [f"request {i}: the quick brown fox" for i in range(32)]
        with httpx.Client(base_url=server.url, timeout=120) as http:
            alone = [complete(http, p) for p in prompts]
            before = http.get("/metrics").text
            with ThreadPoolExecutor(max_workers=32) as pool:
                together = list(pool.map(lambda p: complete(http, p), prompts))
            long_prompt = "def fibonacci(n): return n if n < 2 else fib(n - 1) + fib(n - 2)\n" * 3
            first = complete(http, long_prompt, max_tokens=8)
            second = complete(http, long_prompt, max_tokens=8)
            time.sleep(2.5)  # replicas push their metrics every second
            after = http.get("/metrics").text
        assert together == alone
        steps = _histogram_count(after, "grokserve_decode_batch_size") - _histogram_count(
            before, "grokserve_decode_batch_size"
        )
        small = _histogram_count(after, "grokserve_decode_batch_size", "16.0") - _histogram_count(
            before, "grokserve_decode_batch_size", "16.0"
        )
        assert small < steps, "no decode step ran more than 16 of the 32 concurrent sequences"
        assert first == second
        # 195 prompt tokens: the 12 full 16-token blocks before the last token are hits.
        assert _metric(after, "grokserve_prefix_cache_hits_total") >= 12 * 16
        assert server.ctrl_c(timeout_s=60) == 0
    finally:
        server.kill()


def _metric(text: str, name: str) -> float:
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{")
    )
