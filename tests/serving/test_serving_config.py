"""ServingConfig: the operator-facing contract (pure pydantic, camelCase on the wire)."""

import subprocess
import sys

import pytest
from pydantic import ValidationError

from grokserve.serving.config import ServingConfig


def test_round_trip_through_camel_case_args():
    config = ServingConfig.model_validate(
        {
            "name": "grok-1",
            "replicas": 2,
            "model": {"preset": "grok-1", "source": "/weights/ckpt-0", "dtype": "bfloat16"},
            "parallelism": {
                "gpusPerNode": 8,
                "nodesPerReplica": 2,
                "tensor": 8,
                "expert": 16,
                "strategy": "strict-spread",
            },
            "resources": {"device": "cuda", "acceleratorResource": "GPU"},
            "serving": {"maxBatchSize": 64, "maxSequenceLength": 8192, "maxQueuedRequests": 256},
        }
    )
    args = config.to_args()
    assert args["parallelism"]["gpusPerNode"] == 8
    assert args["serving"]["maxQueuedRequests"] == 256
    assert ServingConfig.from_args(args) == config
    assert config.parallelism.shards == 16
    assert config.parallelism.ray_strategy == "STRICT_SPREAD"
    bundles = config.placement_group_bundles()
    assert len(bundles) == 16
    assert bundles[1] == {"CPU": 1.0, "GPU": 1.0}
    assert bundles[0] == {"CPU": 1.5, "GPU": 1.0}


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (
            {"parallelism": {"gpuMemory": "80"}},
            "parallelism.gpuMemory '80' needs a number and a unit",
        ),
        ({"parallelism": {"strategy": "scatter"}}, "strategy"),
        ({"serving": {"maxBatchSize": 0}}, "maxBatchSize"),
        ({"serving": {"maxQueuedRequest": 3}}, "maxQueuedRequest"),
        ({"name": "Grok_1"}, "name"),
        (
            {"serving": {"maxRequestBytes": 8192, "maxRequestBytesInFlight": 4096}},
            "serving.maxRequestBytesInFlight (4096) is below serving.maxRequestBytes (8192)",
        ),
        ({"model": {"dtype": "float16"}}, "model.dtype"),
    ],
)
def test_bad_input_names_the_field(args, field):
    with pytest.raises(ValidationError) as error:
        ServingConfig.model_validate(args)
    assert field in str(error.value)


def test_config_module_imports_neither_ray_nor_torch():
    code = (
        "import sys, grokserve.serving.config; "
        "bad = [m for m in ('ray', 'torch') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_build_app_rejects_configs_that_cannot_run():
    from grokserve.model.placement import PlacementError
    from grokserve.serving.app import ServingConfigError, build_app

    with pytest.raises(
        ServingConfigError, match=r"serving.maxSequenceLength: .*greater than or equal to 2"
    ):
        build_app({"serving": {"maxSequenceLength": 1}})
    with pytest.raises(ServingConfigError, match="exceeds the model's context length"):
        build_app({"model": {"preset": "grok-tiny"}, "serving": {"maxSequenceLength": 5000}})
    # grok-tiny has 4 kv heads: 8-way tensor parallelism cannot split them.
    with pytest.raises(PlacementError, match="tensor 8 must divide the 4 kv heads"):
        build_app({"parallelism": {"gpusPerNode": 8, "tensor": 8}})
    with pytest.raises(PlacementError, match="tensor 3 must divide the 4 GPUs"):
        build_app({"parallelism": {"gpusPerNode": 4, "tensor": 3}})


def test_the_planner_fills_in_the_degree_left_out():
    from grokserve.model.presets import preset

    config = ServingConfig.model_validate({"parallelism": {"gpusPerNode": 4, "expert": 2}})
    plan = config.plan(preset("grok-tiny"))
    assert (plan.parallelism.tensor, plan.parallelism.expert) == (4, 2)


def test_a_replica_that_does_not_fit_names_the_serving_limits():
    from grokserve.model.placement import PlacementError
    from grokserve.model.presets import preset

    config = ServingConfig.model_validate(
        {
            "model": {"preset": "grok-1", "quantization": "int8", "dtype": "bfloat16"},
            "parallelism": {"gpusPerNode": 8, "gpuMemory": "40Gi"},
            "serving": {"maxBatchSize": 64, "maxSequenceLength": 8192},
        }
    )
    with pytest.raises(PlacementError) as error:
        config.plan(preset("grok-1"))
    message = str(error.value)
    assert "does not fit on 1 node of 8×40 GiB" in message
    assert "serving.maxSequenceLength = 524288 tokens" in message
    assert "parallelism.gpuMemory" in message
