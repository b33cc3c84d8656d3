"""The planner's entry point: a plan that fits, or a refusal that says what would fit."""

from __future__ import annotations

from grokserve.model.config import GrokConfig
from grokserve.model.placement.layout import default_parallelism, fits, layout
from grokserve.model.placement.plan import (
    Cluster,
    DType,
    Headroom,
    Parallelism,
    PlacementError,
    Plan,
    Quantization,
)
from grokserve.model.placement.render import model_name
from grokserve.model.placement.units import gigabytes


class DoesNotFitError(PlacementError):
    """A valid layout whose ranks need more memory than the GPUs have."""


def make_plan(
    config: GrokConfig,
    parallelism: Parallelism | None,
    cluster: Cluster,
    dtype: DType = "bfloat16",
    quantization: Quantization = None,
    headroom: Headroom | None = None,
) -> Plan:
    """The placement of `config` on `cluster`; raises PlacementError (saying what would fit) if it cannot."""
    plan = layout(config, parallelism, cluster, dtype, quantization, headroom or Headroom())
    if not plan.fits():
        raise DoesNotFitError(does_not_fit_message(plan))
    return plan


def does_not_fit_message(plan: Plan) -> str:
    worst = max(plan.ranks, key=lambda r: r.total)
    cluster, name = plan.cluster, model_name(plan.config)
    precision = "int8" if plan.quantization == "int8" else plan.dtype
    lines = [
        f"{name} in {precision} does not fit on {cluster.describe()} "
        f"(tensor {plan.parallelism.tensor}, expert {plan.parallelism.expert}): rank {worst.rank} "
        f"needs {gigabytes(worst.total)} (weights {gigabytes(worst.weights)} + KV cache "
        f"{gigabytes(worst.kv_cache)} + workspace {gigabytes(worst.workspace)} + reserve "
        f"{gigabytes(worst.reserve)}) of {gigabytes(cluster.gpu_memory)}"
    ]
    suggestions = []
    nodes = minimum_nodes(plan.config, cluster, plan.dtype, plan.quantization, plan.headroom)
    if nodes is not None and nodes > cluster.nodes:
        suggestions.append(f"needs ≥ {cluster.describe(nodes)} in {precision}")
    elif nodes is not None:
        default = default_parallelism(plan.config, cluster)
        suggestions.append(
            f"the planner's own choice (tensor {default.tensor}, expert {default.expert}, taken "
            "when none is given) fits"
        )
    if plan.quantization is None:
        int8_nodes = minimum_nodes(plan.config, cluster, plan.dtype, "int8", plan.headroom)
        if int8_nodes is not None:
            noun = "node" if int8_nodes == 1 else "nodes"
            suggestions.append(f"{int8_nodes} {noun} fit{'s' if int8_nodes == 1 else ''} with int8")
    if not suggestions:
        suggestions.append("no number of such nodes up to 64 holds it; use GPUs with more memory")
    return "; ".join([lines[0], *suggestions])


def minimum_nodes(
    config: GrokConfig,
    cluster: Cluster,
    dtype: DType,
    quantization: Quantization,
    headroom: Headroom,
    limit: int = 64,
) -> int | None:
    """The fewest nodes of `cluster`'s kind that hold the model with the default parallelism."""
    for nodes in range(1, limit + 1):
        candidate = cluster.model_copy(update={"nodes": nodes})
        if fits(config, None, candidate, dtype, quantization, headroom):
            return nodes
    return None
