"""`grokserve serve` flags -> ServingConfig, and bad flags fail before anything starts."""

import argparse

from grokserve.commands import serve


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


def test_bad_flags_exit_2_naming_the_setting(capsys):
    assert serve.run(parse("--max-batch-size", "0")) == 2
    assert "maxBatchSize" in capsys.readouterr().err
    assert serve.run(parse("--nodes", "2", "--gpus-per-node", "2", "--tensor", "3")) == 2
    assert "parallelism.tensor=3" in capsys.readouterr().err
