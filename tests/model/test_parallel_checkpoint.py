"""Shards read from checkpoints (the loaders' readers) hold exactly the slices of the loaded model."""

from pathlib import Path

import pytest
import torch

from grokserve.model.checkpoint import open_checkpoint
from grokserve.model.loading import load_model
from grokserve.model.parallel import GrokShard, shard_tensors
from grokserve.model.placement import Cluster, Parallelism, make_plan
from grokserve.model.quantization import QuantizedWeight
from testkit.checkpoints import TWELVE_LAYERS, Checkpoints, write_all
from testkit.sharding import shard_state_dict


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Checkpoints:
    return write_all(tmp_path_factory.mktemp("checkpoints"))


def plan_for(world: int, quantization: str | None):
    return make_plan(
        TWELVE_LAYERS,
        Parallelism(tensor=min(world, 2), expert=min(world, 2)),
        Cluster(nodes=1, gpus_per_node=world, gpu_memory=10**9),
        "float32",
        quantization,
    )


def as_state_dict(tensors, quantization: str | None) -> dict[str, torch.Tensor]:
    """Names and values as a loaded model's state dict holds them (float plans: dequantised)."""
    out = {}
    for name, value in tensors:
        if isinstance(value, QuantizedWeight) and quantization == "int8":
            out[f"{name}.weight"], out[f"{name}.scales"] = value.weight, value.scales
        elif isinstance(value, QuantizedWeight):
            out[name] = value.dequantize(torch.float32)
        else:
            out[name] = value.float()
    return out


@pytest.mark.parametrize("fmt", ["xai", "hf-transformer-sharded", "grokserve"])
@pytest.mark.parametrize("quantization", [None, "int8"])
def test_each_rank_reads_the_slices_of_the_loaded_model(checkpoints, fmt, quantization) -> None:
    path: Path = checkpoints.paths[fmt]
    plan = plan_for(4, quantization)
    loaded = load_model(path, quantization=quantization).state_dict()
    for rank in range(4):
        read = as_state_dict(shard_tensors(open_checkpoint(path), plan, rank), quantization)
        expected = shard_state_dict(loaded, plan, rank)
        assert sorted(read) == sorted(expected)
        for name, tensor in expected.items():
            assert torch.equal(read[name], tensor), f"{fmt} rank {rank} {name}"


def test_a_one_rank_shard_from_the_release_computes_the_loaded_model(checkpoints) -> None:
    path = checkpoints.paths["xai"]
    shard = GrokShard.from_source(open_checkpoint(path), plan_for(1, "int8"), 0)
    tokens = torch.randint(3, 64, (2, 6), generator=torch.Generator().manual_seed(0))
    assert torch.equal(shard(tokens), load_model(path, quantization="int8")(tokens))
