"""The Ray Serve application builder: `grokserve.serving.app:build_app` in serveConfigV2.

applications:
  - name: grok
    import_path: grokserve.serving.app:build_app
    args: {...}          # ServingConfig.to_args()
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError
from ray import serve
from ray.serve import Application

from grokserve.serving.config import CALLS_PER_REPLICA, REPLICA_DEPLOYMENT, ServingConfig
from grokserve.serving.ingress import OpenAIIngress
from grokserve.serving.replica import GrokReplica, MetricsHub

HEALTH_CHECK_PERIOD_SECONDS = 2.0

__all__ = ["REPLICA_DEPLOYMENT", "ServingConfigError", "build_app", "parse_args"]


class ServingConfigError(ValueError):
    """build_app's args are not a valid ServingConfig; the message lists each bad field."""


def parse_args(args: dict[str, Any]) -> ServingConfig:
    try:
        return ServingConfig.from_args(args)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in e['loc']) or '(root)'}: {e['msg']}"
            for e in error.errors()
        )
        raise ServingConfigError(f"invalid grokserve serving config: {problems}") from error


def check_config(config: ServingConfig) -> None:
    """Raise (a one-line message) unless `config` can serve: its checkpoint opens, its context
    fits the model's and its placement plan fits the accelerators. Nothing is started."""
    from grokserve.serving.loading import model_config, placement_plan

    context = model_config(config.model).sequence_len
    if config.serving.max_sequence_length > context:
        raise ServingConfigError(
            f"serving.maxSequenceLength={config.serving.max_sequence_length} exceeds the model's "
            f"context length ({context} tokens)"
        )
    placement_plan(config)


def build_app(args: dict[str, Any]) -> Application:
    config = parse_args(args)
    # Configs that cannot work fail here, before any replica starts.
    check_config(config)
    wire_args = config.to_args()
    # serve.deployment(options)(cls) rather than serve.deployment(cls, options): the same call,
    # in the one form Ray's annotations describe.
    hub = serve.deployment(name="MetricsHub", num_replicas=1, ray_actor_options={"num_cpus": 0})(
        MetricsHub
    ).bind()
    replica = serve.deployment(
        name=REPLICA_DEPLOYMENT,
        ray_actor_options={"num_cpus": config.resources.replica_cpus},
        placement_group_bundles=config.placement_group_bundles(),
        placement_group_strategy=config.parallelism.ray_strategy,
        max_ongoing_requests=CALLS_PER_REPLICA,
        **config.replica_count_options(),
        # A replica whose shard worker died answers 503 until Serve replaces it: look often.
        health_check_period_s=HEALTH_CHECK_PERIOD_SECONDS,
    )(GrokReplica).bind(wire_args, hub)
    ingress = serve.deployment(
        name="OpenAIIngress",
        num_replicas=1,
        ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=10_000,
    )(OpenAIIngress)
    return ingress.bind(replica, hub, wire_args)
