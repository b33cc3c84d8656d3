"""`grokserve serve` flags -> ServingConfig, and bad flags fail before anything starts."""

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from grokserve.commands import serve
from testkit.serving import ServeProcess

LM_EVAL_DATA = Path(__file__).parent / "lm_eval" / "demo_docstrings.jsonl"
# A multiple-choice task over lines of scripts/demo_data/corpus.txt (the demo's training text):
# a line's first words, its true next 16 characters and three other lines' (see the JSONL).
LM_EVAL_TASK = """\
task: demo_docstrings
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
target_delimiter: ""
metric_list:
  - metric: acc
"""


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


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--checkpoint", "/nonexistent"), "/nonexistent does not exist"),
        (("--preset", "grok-1"), "does not fit"),
        (("--preset", "grok-tiny", "--max-sequence-length", "5000"), "maxSequenceLength=5000"),
    ],
)
def test_settings_that_cannot_serve_are_one_line_before_ray_starts(
    flags, message, capsys, monkeypatch
):
    from grokserve.serving.launcher import LocalServing

    def start_ray(*_):
        raise AssertionError("Ray was started for settings that cannot serve")

    monkeypatch.setattr(LocalServing, "start", start_ray)
    assert serve.run(parse(*flags)) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_a_port_in_use_is_one_line(capsys):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert serve.run(parse("--preset", "grok-tiny", "--port", str(port))) == 2
    err = capsys.readouterr().err
    assert f"--port {port}" in err and err.count("\n") == 1, err


def test_missing_dependencies_name_the_extra_to_install(monkeypatch, capsys):
    from grokserve import cli
    from grokserve.commands import operator

    def missing(_):
        raise ModuleNotFoundError("No module named 'kopf'", name="kopf")

    monkeypatch.setattr(operator, "run", missing)
    assert cli.main(["operator"]) == 2
    assert "pip install 'grokserve[operator]'" in capsys.readouterr().err


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory):
    """`grokserve serve` as the README runs it (the shipped demo model), for this module's tests;
    the last test stops it with Ctrl-C."""
    server = ServeProcess(tmp_path_factory.mktemp("demo"))
    try:
        server.wait_serving(timeout_s=240)
        yield server
    finally:
        server.kill()


def test_lm_evaluation_harness_scores_the_demo_through_the_api(demo_server, tmp_path):
    """lm-eval's local-completions with the server's own tokenizer (vLLM's /tokenize routes) on a
    multiple-choice task from the demo's training text: well above chance (0.25), and every
    loglikelihood equal to the in-process model's."""
    task = tmp_path / "tasks"
    task.mkdir()
    (task / "demo_docstrings.yaml").write_text(LM_EVAL_TASK.format(data=LM_EVAL_DATA))
    output = tmp_path / "results"
    model_args = (
        f"model=grok-demo,base_url={demo_server.url}/v1/completions,"
        "tokenizer_backend=remote,num_concurrent=4,max_retries=1"
    )
    offline = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "PYTHONSAFEPATH": "1"}
    done = subprocess.run(
        [
            sys.executable, "-m", "lm_eval", "--model", "local-completions",
            "--model_args", model_args, "--tasks", "demo_docstrings",
            "--include_path", str(task), "--output_path", str(output), "--log_samples",
        ],
        env={**os.environ, **offline},
        capture_output=True,
        text=True,
        timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    [results] = output.rglob("results_*.json")
    accuracy = json.loads(results.read_text())["results"]["demo_docstrings"]["acc,none"]
    assert accuracy >= 0.45, accuracy
    [samples] = output.rglob("samples_demo_docstrings_*.jsonl")
    scored = [json.loads(line) for line in samples.read_text().splitlines()]
    assert len(scored) == 40
    model, tokenizer = _demo_model()
    for sample in scored:
        pairs = [(a["arg_0"], a["arg_1"]) for a in sample["arguments"].values()]
        for (context, continuation), (served, _) in zip(
            pairs, sample["filtered_resps"], strict=True
        ):
            expected = _loglikelihood(model, tokenizer, context, continuation)
            assert float(served) == pytest.approx(expected, abs=1e-4), (context, continuation)


def _demo_model():
    from grokserve.model import load_model
    from grokserve.model.tokenizer import Tokenizer
    from grokserve.serving.loading import DEMO_CHECKPOINT

    model = load_model(str(DEMO_CHECKPOINT), "float32", "cpu")
    return model, Tokenizer(DEMO_CHECKPOINT / "tokenizer.model", model.config.special_tokens)


def _loglikelihood(model, tokenizer, context, continuation):
    """As lm-eval splits a pair: the whole text's tokens after the context's own."""
    import torch

    whole = tokenizer.encode(context + continuation)
    start = len(tokenizer.encode(context))
    with torch.inference_mode():
        logits = model(torch.tensor([whole]), cache=model.new_cache(1, len(whole)))[0]
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    return sum(logprobs[p - 1, whole[p]].item() for p in range(start, len(whole)))


def test_readme_command_serves_the_demo_and_stops_on_ctrl_c(demo_server):
    """`grokserve serve` as the README runs it: the shipped demo model answers, Ctrl-C exits 0
    within 5 s."""
    server = demo_server
    assert _answers(f"{server.url}/readyz")
    request = {"model": "grok-demo", "prompt": "Return the", "max_tokens": 16}
    reply = httpx.post(f"{server.url}/v1/completions", json=request, timeout=60)
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["text"].strip()
    unknown = httpx.post(f"{server.url}/v1/completions", json={**request, "model": "gpt-4"})
    assert unknown.status_code == 404 and "grok-demo" in unknown.text
    started = time.monotonic()
    assert server.ctrl_c(timeout_s=30) == 0
    assert time.monotonic() - started < 5
    log = server.log.read_text()
    assert "shutting down" in log
    assert "will not be applied" not in log, "a misleading Serve line on a fresh start"


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


def test_generate_defaults_to_the_demo_checkpoint_on_one_thread(capsys):
    import torch

    from grokserve import cli

    threads = torch.get_num_threads()
    try:
        assert cli.main(["generate", "--prompt", "Return the", "--max-tokens", "8"]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr()
    assert out.out.strip() and "8 generated" in out.err


def test_the_ingress_process_does_not_load_torch():
    """The ingress only validates and relays: torch (hundreds of MB) stays in the replicas."""
    check = "import sys, grokserve.serving.ingress; sys.exit('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", check], env={**os.environ, "PYTHONSAFEPATH": "1"})
    assert done.returncode == 0
