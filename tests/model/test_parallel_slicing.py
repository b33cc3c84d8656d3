"""Cutting weights for one rank, without processes: int8 row blocks, memory accounting, refusals."""

import pytest
import torch

from grokserve.model import GrokModel, preset
from grokserve.model.parallel import (
    GrokShard,
    ShardingError,
    StateDictSource,
    block_unit,
    check_rank,
    rows,
)
from grokserve.model.placement import Cluster, ExpertSlice, Parallelism, Plan, make_plan
from grokserve.model.quantization import quantize
from testkit.sharding import shard_state_dict

TINY = preset("grok-tiny")


def tiny_plan(world: int, tensor: int, expert: int, quantization: str | None = None) -> Plan:
    return make_plan(
        TINY,
        Parallelism(tensor=tensor, expert=expert),
        Cluster(nodes=1, gpus_per_node=world, gpu_memory=10**9),
        "float32",
        quantization,
    )


@pytest.fixture(scope="module")
def model() -> GrokModel:
    return GrokModel.from_preset("grok-tiny", seed=0)


@pytest.mark.parametrize(("start", "stop"), [(3, 9), (9, 21), (0, 48), (12, 24), (5, 6)])
def test_int8_row_slices_off_block_boundaries_dequantise_to_the_same_rows(start, stop) -> None:
    matrix = quantize(torch.randn(2, 48, 5, generator=torch.Generator().manual_seed(0)), blocks=8)
    piece = rows(matrix, start, stop, block_unit(matrix, (start, stop)))
    assert piece.weight.dtype == torch.int8
    assert torch.equal(piece.dequantize(), matrix.dequantize()[:, start:stop])


@pytest.mark.parametrize(
    ("world", "tensor", "expert"), [(2, 2, 1), (4, 2, 2), (4, 4, 4), (4, 1, 1)]
)
@pytest.mark.parametrize("int8", [False, True])
def test_plan_memory_equals_the_bytes_each_rank_holds(model, world, tensor, expert, int8) -> None:
    source = model.quantized() if int8 else model
    plan = tiny_plan(world, tensor, expert, "int8" if int8 else None)
    for rank in range(world):
        local = shard_state_dict(source.state_dict(), plan, rank)
        held = sum(t.numel() * t.element_size() for t in local.values())
        assert held == plan.ranks[rank].weights


def test_a_one_rank_shard_is_the_model(model) -> None:
    shard = GrokShard.from_state_dict(model.state_dict(), tiny_plan(1, 1, 1), 0)
    tokens = torch.randint(3, 256, (2, 7), generator=torch.Generator().manual_seed(1))
    assert torch.equal(shard(tokens), model(tokens))


def test_int8_weights_in_a_float_plan_are_sliced_then_dequantised(model) -> None:
    int8 = model.quantized()
    shard = GrokShard.from_state_dict(int8.state_dict(), tiny_plan(1, 1, 1), 0)
    assert shard.layers[0].moe.w_down.dtype == torch.float32
    tokens = torch.randint(3, 256, (1, 5), generator=torch.Generator().manual_seed(2))
    assert torch.equal(shard(tokens), int8(tokens))


def test_every_tensor_is_read_once(model) -> None:
    reads: list[str] = []

    class Recording(StateDictSource):
        def read(self, name):
            reads.append(name)
            return super().read(name)

    GrokShard.from_source(Recording(model.state_dict()), tiny_plan(1, 1, 1), 0)
    assert sorted(reads) == sorted(model.state_dict())


@pytest.mark.parametrize(("world", "tensor", "expert"), [(4, 2, 2), (4, 1, 1)])
def test_float_weights_for_an_int8_plan_are_quantised_like_the_whole_model(
    model, world, tensor, expert
) -> None:
    plan = tiny_plan(world, tensor, expert, "int8")
    for rank in range(world):
        from_float = shard_state_dict(model.state_dict(), plan, rank)
        from_int8 = shard_state_dict(model.quantized().state_dict(), plan, rank)
        assert sorted(from_float) == sorted(from_int8)
        assert all(torch.equal(from_float[k], from_int8[k]) for k in from_int8)


def test_a_multi_rank_shard_needs_a_process_group(model) -> None:
    with pytest.raises(ShardingError, match="initialise torch.distributed"):
        GrokShard.from_state_dict(model.state_dict(), tiny_plan(2, 2, 1), 0)


def test_replicated_experts_are_refused_for_execution() -> None:
    plan = tiny_plan(2, 1, 2)
    f = TINY.ffn_size
    data = plan.model_dump(mode="json")
    for layer in data["layers"]:
        layer[0]["experts"][0] = ExpertSlice(expert=0, f_start=0, f_stop=f, replicas=2).model_dump()
        layer[1]["experts"].append(
            ExpertSlice(expert=0, f_start=0, f_stop=f, replica=1, replicas=2).model_dump()
        )
    with pytest.raises(ShardingError, match="replicates experts"):
        check_rank(Plan.model_validate(data), 1)


def test_a_rank_outside_the_plan_is_refused() -> None:
    with pytest.raises(ShardingError, match="rank 2 is outside the plan's 2 ranks"):
        check_rank(tiny_plan(2, 2, 1), 2)
