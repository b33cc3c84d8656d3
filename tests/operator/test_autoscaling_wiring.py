"""How the autoscaler is wired into the operator: spec → policy knobs, the daemon's filter, and its
registration among the operator's handlers."""

from __future__ import annotations

import kopf

from grokserve.operator.autoscaling.daemon import autoscaling_enabled, policy_config
from grokserve.operator.autoscaling.policy import PolicyConfig
from grokserve.operator.spec import AutoscalingSpec


def test_every_spec_field_reaches_the_policy() -> None:
    spec = AutoscalingSpec.model_validate(
        {
            "enabled": True,
            "minReplicas": 0,
            "maxReplicas": 7,
            "prometheusUrl": "http://prometheus:9090",
            "targetQueuePerReplica": 6.5,
            "tolerance": 0.2,
            "scaleUpStabilizationSeconds": 11,
            "scaleDownStabilizationSeconds": 222,
            "scaleUpLimit": 3,
            "scaleDownLimit": 2,
            "evaluationIntervalSeconds": 15,
            "scaleToZeroIdleSeconds": 600,
        }
    )
    assert policy_config(spec) == PolicyConfig(
        min_replicas=0,
        max_replicas=7,
        target_queue_per_replica=6.5,
        tolerance=0.2,
        scale_up_stabilization_s=11,
        scale_down_stabilization_s=222,
        scale_up_max_step=3,
        scale_down_max_step=2,
        idle_window_s=600,
    )


def test_the_daemon_runs_only_where_autoscaling_is_enabled() -> None:
    assert autoscaling_enabled({"autoscaling": {"enabled": True}})
    assert not autoscaling_enabled({"autoscaling": {"enabled": False}})
    assert not autoscaling_enabled({"autoscaling": None})
    assert not autoscaling_enabled({})


def test_the_operator_registers_the_autoscaler() -> None:
    import grokserve.operator.handlers  # noqa: F401  (registers into kopf's default registry)

    spawned = kopf.get_default_registry()._spawning.get_all_handlers()
    (autoscaler,) = [handler for handler in spawned if handler.id == "autoscaler"]
    assert autoscaler.when is autoscaling_enabled
