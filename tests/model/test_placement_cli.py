"""`grokserve plan`: the table, --json, and refusals with the reason and exit status 1."""

import argparse
import json

import pytest

from grokserve.commands import plan as plan_command
from grokserve.model.placement import Plan
from testkit.checkpoints import TWELVE_LAYERS, hf_config

GROK_2X8 = ["--preset", "grok-1", "--nodes", "2", "--gpus-per-node", "8", "--gpu-memory", "80GB"]


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    plan_command.add_arguments(parser)
    return plan_command.run(parser.parse_args(argv))


def test_bf16_on_two_nodes_prints_a_table_of_every_rank(capsys) -> None:
    assert run([*GROK_2X8, "--dtype", "bfloat16"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[1].split() == [
        "rank",
        "node",
        "q",
        "heads",
        "kv",
        "heads",
        "experts",
        "per",
        "layer",
        "weights",
        "total",
    ]
    assert lines[2].split()[:5] == ["0", "0", "0-5", "0", "0-3"]
    assert lines[17].split()[:5] == ["15", "1", "42-47", "7", "4-7"]
    assert "node 1 holds experts 4-7" in out


def test_bf16_on_one_node_is_refused(capsys) -> None:
    argv = [*GROK_2X8, "--dtype", "bfloat16"]
    argv[argv.index("--nodes") + 1] = "1"
    assert run(argv) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "needs ≥ 2 nodes of 8×80 GB in bfloat16; 1 node fits with int8" in captured.err


def test_int8_on_one_node_fits_and_prints_json(capsys) -> None:
    argv = [*GROK_2X8, "--quantization", "int8", "--json"]
    argv[argv.index("--nodes") + 1] = "1"
    assert run(argv) == 0
    plan = Plan.from_json(capsys.readouterr().out)
    assert plan.quantization == "int8" and plan.world_size == 8


def test_explicit_parallelism_is_used(capsys) -> None:
    assert run([*GROK_2X8, "--tensor", "4", "--expert", "8", "--json"]) == 0
    plan = Plan.from_json(capsys.readouterr().out)
    assert (plan.parallelism.tensor, plan.parallelism.expert) == (4, 8)
    assert [p.expert for p in plan.shard(0, 15).experts] == [7]


@pytest.mark.parametrize(
    ("extra", "complaint"),
    [
        (["--gpu-memory", "lots"], "--gpu-memory 'lots' needs a number and a unit"),
        (["--gpu-memory", "80"], "--gpu-memory '80' needs a number and a unit: Ki, Mi, Gi"),
        (["--tensor", "3"], "tensor 3 must divide the 8 kv heads"),
        (["--preset", "grok-2"], "unknown preset 'grok-2'"),
        (["--config", "/nonexistent/config.json"], "No such file"),
    ],
)
def test_bad_requests_fail_with_the_reason(capsys, extra, complaint) -> None:
    assert run([*GROK_2X8, *extra]) == 1
    assert complaint in capsys.readouterr().err


@pytest.mark.parametrize(
    ("change", "complaint"),
    [
        ({"hidden_size": 0}, "hidden_size must be a positive integer, got 0"),
        ({"hidden_size": "16"}, "hidden_size must be a positive integer, got '16'"),
        ({"num_experts": 0}, "num_experts must be a positive integer, got 0"),
    ],
)
def test_a_config_with_a_bad_field_is_refused_by_name(tmp_path, capsys, change, complaint) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**hf_config(TWELVE_LAYERS), **change}))
    assert run([*GROK_2X8, "--config", str(path)]) == 1
    assert complaint in capsys.readouterr().err


def test_float16_is_not_offered(capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        run([*GROK_2X8, "--dtype", "float16"])
    assert exit_.value.code == 2
    assert "invalid choice: 'float16'" in capsys.readouterr().err


def test_no_arguments_print_grok1_on_the_fewest_nodes_that_hold_it(capsys) -> None:
    assert run([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("grok-1 on 2 nodes of 8×80 GiB (bfloat16)")


def test_the_fewest_nodes_are_chosen_for_int8(capsys) -> None:
    assert run(["--quantization", "int8", "--json"]) == 0
    assert Plan.from_json(capsys.readouterr().out).cluster.nodes == 1
