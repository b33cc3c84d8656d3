"""One rank's shard of GrokModel, built from a placement plan, executed SPMD over torch.distributed.

The arithmetic stays in `transformer.py`; this module only cuts the weights and adds the partial sums:

- attention: the rank's kv heads with their query heads (column slices of wq/wk/wv, the matching row
  slice of wo); the output is a partial sum, added over the rank's attention group (all-reduce);
- MoE: every rank routes every token (the router is replicated), runs its own experts (or F slices of
  them) on the tokens routed there, and the partial sums are added over all ranks (all-reduce).

Every rank holds the same activations, so the MoE needs no token exchange before the experts: the
"all-gather" of the tokens is free, and one all-reduce of [tokens, D] per layer brings the outputs
together. An all-to-all dispatch would only pay off with sequence-sharded activations (each rank holding
different tokens), which this SPMD layout does not have. Partial sums are added in the compute dtype
(bf16 on the wire for a bf16 model). In float32 the result equals the single-device model up to
summation order (≤ 1e-5); in bf16 each rank's partial is rounded before the sum, so logits differ
by bf16 rounding.

Embedding, norms and router are replicated, so every rank computes the full float32 logits.

8-bit weights are sliced before dequantisation; float weights for an int8 plan are quantised per whole
matrix (per expert), as `GrokModel.quantized` and `load_model` do, then sliced. Row slices of wo and w_down keep the released row-block
scales: a slice that does not start or stop on a block boundary gets finer blocks (each old block's
scale repeated), so the dequantised values are exactly those of the full matrix.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from datetime import timedelta
from typing import Literal, Protocol

import torch
import torch.distributed as dist
from torch import nn

from grokserve.model.cache import KVCache
from grokserve.model.placement import Plan, Shard
from grokserve.model.quantization import QuantizedWeight, quantize
from grokserve.model.transformer import ROW_BLOCKS, Attention, GrokModel, MoE, Step

Weight = torch.Tensor | QuantizedWeight
FLOAT32_SUFFIXES = ("scale", "moe.router")


class ShardingError(ValueError):
    """A plan, weights or process group that cannot make this rank's shard."""


class TensorSource(Protocol):
    """Reads one full tensor by its GrokModel name (e.g. `layers.3.moe.w_down`), int8 ones unconverted."""

    def read(self, name: str) -> Weight: ...


class StateDictSource:
    """A GrokModel `state_dict()` (float, or int8 with `<name>.weight` / `<name>.scales`) as a source."""

    def __init__(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        self.state_dict = state_dict

    def read(self, name: str) -> Weight:
        if name in self.state_dict:
            return self.state_dict[name]
        weight, scales = f"{name}.weight", f"{name}.scales"
        if weight in self.state_dict and scales in self.state_dict:
            return QuantizedWeight(self.state_dict[weight], self.state_dict[scales])
        raise KeyError(f"the state dict holds no tensor {name!r}")


# -- slicing --------------------------------------------------------------------------------------


def columns(value: Weight, start: int, stop: int) -> Weight:
    if isinstance(value, QuantizedWeight):
        return QuantizedWeight(
            value.weight[..., start:stop].contiguous(), value.scales[..., start:stop].contiguous()
        )
    return value[..., start:stop]


def block_unit(value: Weight, bounds: Iterable[int]) -> int:
    """The largest row count that divides the matrix's scale blocks and every slice boundary."""
    if not isinstance(value, QuantizedWeight):
        return 1
    unit = value.shape[-2] // value.row_blocks
    for bound in bounds:
        unit = math.gcd(unit, bound)
    return unit


def rows(value: Weight, start: int, stop: int, unit: int) -> Weight:
    """Rows [start, stop) of a matrix; int8 scales re-blocked to `unit` rows (from `block_unit`)."""
    if not isinstance(value, QuantizedWeight):
        return value[..., start:stop, :]
    block = value.shape[-2] // value.row_blocks
    scales = value.scales.repeat_interleave(block // unit, dim=-2)
    return QuantizedWeight(
        value.weight[..., start:stop, :].contiguous(),
        scales[..., start // unit : stop // unit, :].contiguous(),
    )


def stack(values: list[Weight]) -> Weight:
    quantized = [v for v in values if isinstance(v, QuantizedWeight)]
    dense = [v for v in values if not isinstance(v, QuantizedWeight)]
    if quantized and dense:
        raise ValueError("cannot stack int8 and float weights together: quantize all or none")
    if quantized:
        return QuantizedWeight(
            torch.stack([v.weight for v in quantized]), torch.stack([v.scales for v in quantized])
        )
    return torch.stack(dense)


def one_expert(value: Weight, expert: int) -> Weight:
    if isinstance(value, QuantizedWeight):
        return QuantizedWeight(value.weight[expert], value.scales[expert])
    return value[expert]


def as_stored(value: Weight, matrix: str, plan: Plan) -> Weight:
    """A float matrix quantised for an int8 plan, whole (as `GrokModel.quantized` does), before slicing."""
    if plan.quantization == "int8" and not isinstance(value, QuantizedWeight):
        return quantize(value.float(), ROW_BLOCKS.get(matrix, 1))
    return value


def expert_matrices(value: Weight, matrix: str, shard: Shard, plan: Plan) -> Weight:
    """The rank's experts (in the shard's order) with their F slices, from a full [E, ...] stack."""
    bounds = [b for p in shard.experts for b in (p.f_start, p.f_stop)]
    parts = []
    for piece in shard.experts:
        expert = as_stored(one_expert(value, piece.expert), matrix, plan)
        if matrix == "w_down":  # [F, D]: F is the row axis
            parts.append(rows(expert, piece.f_start, piece.f_stop, block_unit(expert, bounds)))
        else:
            parts.append(columns(expert, piece.f_start, piece.f_stop))
    return stack(parts)


def attention_matrix(value: Weight, matrix: str, shard: Shard, plan: Plan) -> Weight:
    value = as_stored(value, matrix, plan)
    key_size = plan.config.key_size
    q_start, q_stop = (h * key_size for h in shard.q_heads)
    if matrix == "wq":
        return columns(value, q_start, q_stop)
    if matrix in ("wk", "wv"):
        return columns(value, *(h * key_size for h in shard.kv_heads))
    return rows(value, q_start, q_stop, block_unit(value, (q_start, q_stop)))


def local_names(plan: Plan) -> Iterator[str]:
    yield "embed.weight"
    for layer in range(plan.config.num_layers):
        prefix = f"layers.{layer}"
        for norm in ("pre_attn_norm", "post_attn_norm", "pre_moe_norm", "post_moe_norm"):
            yield f"{prefix}.{norm}.scale"
        for matrix in Attention.MATRICES:
            yield f"{prefix}.attn.{matrix}"
        yield f"{prefix}.moe.router"
        for matrix in MoE.MATRICES:
            yield f"{prefix}.moe.{matrix}"
    yield "final_norm.scale"


def shard_tensors(source: TensorSource, plan: Plan, rank: int) -> Iterator[tuple[str, Weight]]:
    """(name, this rank's part) for every parameter, reading one full tensor at a time."""
    check_rank(plan, rank)
    for name in local_names(plan):
        value = source.read(name)
        parts = name.split(".")
        if parts[0] == "layers" and parts[2] in ("attn", "moe") and parts[3] != "router":
            shard = plan.shard(int(parts[1]), rank)
            if parts[2] == "attn":
                value = attention_matrix(value, parts[3], shard, plan)
            else:
                value = expert_matrices(value, parts[3], shard, plan)
        yield name, value


def check_rank(plan: Plan, rank: int) -> None:
    if not 0 <= rank < plan.world_size:
        raise ShardingError(f"rank {rank} is outside the plan's {plan.world_size} ranks")
    kv_counts = {
        s.kv_heads[1] - s.kv_heads[0]
        for s in (plan.shard(i, rank) for i in range(len(plan.layers)))
    }
    if len(kv_counts) > 1:
        raise ShardingError(
            f"rank {rank} holds {sorted(kv_counts)} kv heads in different layers; its KV cache "
            "needs the same count in every layer"
        )
    for index, shards in enumerate(plan.layers):
        if any(p.replicas > 1 for p in shards[rank].experts):
            raise ShardingError(
                f"layer {index}: the plan replicates experts on rank {rank}; replicated experts are "
                "expressible in plans but not executed yet"
            )


# -- the shard ------------------------------------------------------------------------------------


class SumOverGroup:
    """Adds a partial result over the ranks of a process group, in the partial's own dtype.

    bf16 partials are summed in bf16: half the bytes of a float32 all-reduce, twice per layer. Each
    partial is already rounded to bf16, so with 2 ranks the sum is the same one rounding either way;
    a ring over more ranks rounds at each hop (docs/placement.md has the error against float32
    sums: well inside bf16's own distance from the float32 model)."""

    def __init__(self, group: dist.ProcessGroup | None, size: int) -> None:
        self.group, self.size = group, size

    def __call__(self, partial: torch.Tensor) -> torch.Tensor:
        if self.size == 1:
            return partial
        dist.all_reduce(partial, group=self.group)  # partials are fresh products: summed in place
        return partial


class ShardAttention(Attention):
    def __init__(self, *args, total: SumOverGroup, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.total = total

    def forward(self, x: torch.Tensor, step: Step, layer: int) -> torch.Tensor:
        return self.total(super().forward(x, step, layer))


class ShardMoE(MoE):
    def __init__(self, *args, total: SumOverGroup, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.total = total

    def forward(self, x: torch.Tensor, step: Step) -> torch.Tensor:
        return self.total(super().forward(x, step))


class GrokShard(GrokModel):
    """Rank `rank`'s part of the model in `plan`, with GrokModel's `forward`/`new_cache`/`expert_token_counts`.

    Every rank of the process group calls `forward` with the same tokens (and cache rows); every rank
    returns the full float32 logits. Build every rank's shard in the same order: construction creates
    the attention process groups, a collective call.
    """

    def __init__(
        self, plan: Plan, rank: int, tensors: Iterable[tuple[str, Weight]], device: torch.device
    ) -> None:
        config, dtype = plan.config, getattr(torch, plan.dtype)
        # Built on the meta device (no memory), then every tensor is replaced by this rank's part.
        super().__init__(config, dtype, device="meta")
        self.plan, self.rank = plan, rank
        attention_total, moe_total = process_groups(plan, rank)
        for index, layer in enumerate(self.decoder_layers()):
            shard = plan.shard(index, rank)
            layer.attn = ShardAttention(
                config,
                dtype,
                "meta",
                q_heads=shard.q_heads[1] - shard.q_heads[0],
                kv_heads=shard.kv_heads[1] - shard.kv_heads[0],
                total=attention_total,
            )
            layer.moe = ShardMoE(
                config,
                dtype,
                "meta",
                expert_ids=[p.expert for p in shard.experts],
                ffn_size=shard.experts[0].size if shard.experts else 0,
                total=moe_total,
            )
            layer.moe.routed_tokens = torch.zeros_like(layer.moe.routed_tokens, device=device)
        self.quantization = plan.quantization
        self.install(tensors, device)

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    def install(self, tensors: Iterable[tuple[str, Weight]], device: torch.device) -> None:
        expected = dict(self.named_parameters())
        installed = set()
        for name, value in tensors:
            if name not in expected:
                raise ShardingError(f"unexpected tensor {name!r} for this shard")
            owner_name, _, attr = name.rpartition(".")
            owner = self.get_submodule(owner_name)
            wanted = tuple(expected[name].shape)
            if tuple(value.shape) != wanted:
                raise ShardingError(
                    f"{name}: got shape {tuple(value.shape)}, the shard needs {wanted}"
                )
            delattr(owner, attr)
            setattr(owner, attr, self.convert(name, value, device))
            installed.add(name)
        missing = expected.keys() - installed
        if missing:
            raise ShardingError(
                f"no weights given for {len(missing)} tensor(s), e.g. {min(missing)}"
            )

    def convert(self, name: str, value: Weight, device: torch.device) -> nn.Module | nn.Parameter:
        if isinstance(value, QuantizedWeight):
            if self.quantization == "int8":
                return value.to(device)
            value = value.dequantize(self.dtype, device)
        elif self.quantization == "int8" and not name.endswith((*FLOAT32_SUFFIXES, "embed.weight")):
            raise ShardingError(
                f"{name}: an int8 shard needs 8-bit matrices (shard_tensors quantises them), "
                f"got {value.dtype}"
            )
        dtype = torch.float32 if name.endswith(FLOAT32_SUFFIXES) else self.dtype
        return nn.Parameter(value.to(device=device, dtype=dtype), requires_grad=False)

    def forward(
        self, tokens: torch.Tensor, cache: KVCache | None = None, rows: torch.Tensor | None = None
    ) -> torch.Tensor:
        return super().forward(tokens.to(self.device), cache, rows)

    @classmethod
    def from_state_dict(
        cls,
        state_dict: Mapping[str, torch.Tensor],
        plan: Plan,
        rank: int,
        device: torch.device | None = None,
    ) -> GrokShard:
        """From a full in-memory model's `state_dict()` (tests, small models)."""
        return cls.from_source(StateDictSource(state_dict), plan, rank, device)

    @classmethod
    def from_source(
        cls, source: TensorSource, plan: Plan, rank: int, device: torch.device | None = None
    ) -> GrokShard:
        """From a checkpoint reader: only this rank's parts are kept, one full tensor read at a time."""
        device = device or shard_device(plan, rank)
        return cls(plan, rank, shard_tensors(source, plan, rank), device)


# -- process groups -------------------------------------------------------------------------------


def process_groups(plan: Plan, rank: int) -> tuple[SumOverGroup, SumOverGroup]:
    """(attention sum, MoE sum) for this rank; creates the attention groups (collective)."""
    if plan.world_size == 1:
        return SumOverGroup(None, 1), SumOverGroup(None, 1)
    if not dist.is_initialized():
        raise ShardingError(
            f"the plan has {plan.world_size} ranks: initialise torch.distributed first "
            "(see start_process_group)"
        )
    if dist.get_world_size() != plan.world_size or dist.get_rank() != rank:
        raise ShardingError(
            f"this process is rank {dist.get_rank()} of {dist.get_world_size()}, the shard is rank "
            f"{rank} of a {plan.world_size}-rank plan"
        )
    tensor = plan.parallelism.tensor
    mine = None
    for ranks in plan.attention_groups():
        # Every rank must create every group, in the same order, even those it is not part of.
        group = dist.new_group(ranks) if tensor < plan.world_size else None
        if rank in ranks:
            mine = group
    return SumOverGroup(mine, tensor), SumOverGroup(None, plan.world_size)


def shard_device(plan: Plan, rank: int, kind: Literal["cpu", "cuda"] | None = None) -> torch.device:
    """The rank's device of `kind`: for CUDA its GPU by its local rank on its node. None takes
    CUDA when present, else the CPU."""
    if kind is None:
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cpu":
        return torch.device("cpu")
    # Fail here rather than serve from the CPU unnoticed, or fail later inside torch.
    if not torch.cuda.is_available():
        raise ShardingError(
            f"rank {rank} was asked to run on CUDA, but this process sees no CUDA device"
        )
    return torch.device("cuda", plan.ranks[rank].local_rank % torch.cuda.device_count())


def start_process_group(
    plan: Plan,
    rank: int,
    address: str,
    port: int,
    timeout: float = 300.0,
    kind: Literal["cpu", "cuda"] | None = None,
) -> torch.device:
    """Joins the replica's process group (NCCL on GPUs, gloo on the CPU); returns the rank's device
    (see `shard_device` for `kind`)."""
    device = shard_device(plan, rank, kind)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend="nccl" if device.type == "cuda" else "gloo",
        init_method=f"tcp://{address}:{port}",
        world_size=plan.world_size,
        rank=rank,
        timeout=timedelta(seconds=timeout),
        device_id=device if device.type == "cuda" else None,
    )
    return device
