"""A plan as people read it: the table `grokserve plan` prints and the summary the operator shows."""

from __future__ import annotations

from typing import TYPE_CHECKING

from grokserve.model.config import GrokConfig
from grokserve.model.placement.units import GB, gigabytes
from grokserve.model.presets import PRESETS

if TYPE_CHECKING:
    from grokserve.model.placement.plan import Plan, Shard


def render_table(plan: Plan) -> str:
    """rank, node, heads, experts per layer, memory: one line per rank, then the notes."""
    header = ("rank", "node", "q heads", "kv heads", "experts per layer", "weights", "total")
    rows = []
    for memory in plan.ranks:
        layouts = {plan.shard(i, memory.rank) for i in range(len(plan.layers))}
        shard = plan.shard(0, memory.rank)
        experts = (
            describe_experts(shard, plan.config.ffn_size)
            if len(layouts) == 1
            else "varies by layer"
        )
        heads = (
            (compact(list(range(*shard.q_heads))), compact(list(range(*shard.kv_heads))))
            if len(layouts) == 1
            else ("varies", "varies")
        )
        rows.append(
            (
                str(memory.rank),
                str(memory.node),
                *heads,
                experts,
                gigabytes(memory.weights),
                gigabytes(memory.total),
            )
        )
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in (header, *rows)
    ]
    headroom = plan.headroom
    rule = (
        f"total = weights + KV cache ({headroom.cache_tokens} tokens) + workspace (a "
        f"{headroom.step_tokens or plan.config.sequence_len}-token step) + reserve "
        f"({headroom.reserve_fraction:.0%} of {gigabytes(plan.cluster.gpu_memory)})"
    )
    return "\n".join([title(plan), *lines, rule, *(f"- {note}" for note in plan.notes)])


def title(plan: Plan) -> str:
    precision = f"int8 weights, {plan.dtype} activations" if plan.quantization else plan.dtype
    return (
        f"{model_name(plan.config)} on {plan.cluster.describe()} ({precision}); "
        f"tensor {plan.parallelism.tensor}, expert {plan.parallelism.expert}, "
        f"{plan.world_size // plan.parallelism.expert} F slice(s) per expert"
    )


def render_summary(plan: Plan) -> str:
    """The title, then per rank: its node, heads and experts (in every layer) and GPU memory."""
    lines = [title(plan)]
    for memory in plan.ranks:
        layouts = {plan.shard(i, memory.rank) for i in range(len(plan.layers))}
        shard = plan.shard(0, memory.rank)
        held = (
            f"q heads {compact(list(range(*shard.q_heads)))}, "
            f"kv heads {compact(list(range(*shard.kv_heads)))}, "
            f"experts {describe_experts(shard, plan.config.ffn_size)}"
            if len(layouts) == 1
            else "heads and experts vary by layer"
        )
        lines.append(
            f"rank {memory.rank} (node {memory.node}): {held}; "
            f"{memory.total / GB:.1f} of {plan.cluster.gpu_memory / GB:.1f} GB"
        )
    return "\n".join(lines)


def describe_experts(shard: Shard, ffn_size: int) -> str:
    by_span: dict[tuple[int, int], list[int]] = {}
    for piece in shard.experts:
        by_span.setdefault((piece.f_start, piece.f_stop), []).append(piece.expert)
    parts = []
    for (start, stop), experts in by_span.items():
        span = "" if (start, stop) == (0, ffn_size) else f" F[{start}:{stop}]"
        parts.append(f"{compact(sorted(experts))}{span}")
    return "; ".join(parts)


def model_name(config: GrokConfig) -> str:
    return next((name for name, known in PRESETS.items() if known == config), "the model")


def compact(values: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2,5"."""
    runs: list[list[int]] = []
    for value in values:
        if runs and value == runs[-1][-1] + 1:
            runs[-1].append(value)
        else:
            runs.append([value])
    return ",".join(str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs)
