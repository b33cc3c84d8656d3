"""The autoscaling policy on canned time sequences: each test checks the exact decision sequence
that docs/autoscaling.md says it must produce."""

from __future__ import annotations

import pytest

from grokserve.operator.autoscaling.policy import (
    MetricFailure,
    PolicyConfig,
    QueueSample,
    Reason,
    ScalingPolicy,
)

UNREACHABLE = MetricFailure("PrometheusUnreachable", "connection refused")


def drive(
    policy: ScalingPolicy,
    start: int,
    steps: list[tuple[float, QueueSample | MetricFailure]],
    loading_for: int = 0,
) -> list[tuple[float, int, str]]:
    """Feed samples in time order, applying each decision as the operator would (spec.replicas
    follows the decision); a new replica stays loading for `loading_for` evaluations."""
    current, loading_until, trace = start, [], []
    for index, (now, sample) in enumerate(steps):
        loading_until = [until for until in loading_until if until > index]
        ready = current - len(loading_until)
        decision = policy.decide(now, current, ready, sample)
        if decision.replicas > current:
            loading_until += [index + 1 + loading_for] * (decision.replicas - current)
        elif decision.replicas < current:
            loading_until = loading_until[
                : max(0, len(loading_until) - (current - decision.replicas))
            ]
        current = decision.replicas
        trace.append((now, current, decision.reason))
    return trace


def waiting(value: float, running: float | None = 1.0) -> QueueSample:
    return QueueSample(waiting=value, running=running)


def config(**overrides: object) -> PolicyConfig:
    base: dict[str, object] = {
        "min_replicas": 1,
        "max_replicas": 6,
        "target_queue_per_replica": 8,
        "tolerance": 0.1,
        "scale_up_stabilization_s": 0,
        "scale_down_stabilization_s": 30,
    }
    return PolicyConfig(**(base | overrides))  # type: ignore[arg-type]


def test_burst_scales_up_at_once_and_clamps_to_max() -> None:
    trace = drive(
        ScalingPolicy(config()),
        1,
        [(0, waiting(4)), (1, waiting(30)), (2, waiting(100)), (3, waiting(100))],
    )
    assert trace == [
        (0, 1, Reason.AT_MIN_REPLICAS),  # 4 < 8 per replica but already at min
        (1, 4, Reason.SCALE_UP),  # ceil(1 × 30 / 8) = 4
        (2, 6, Reason.SCALE_UP),  # ceil(4 × 25 / 8) = 13 → clamped to max 6
        (3, 6, Reason.AT_MAX_REPLICAS),
    ]


def test_slow_ramp_adds_replicas_as_the_queue_crosses_each_multiple_of_target() -> None:
    steps = [(t, waiting(w)) for t, w in enumerate([6, 8, 9, 12, 17, 20, 25, 33])]
    trace = drive(ScalingPolicy(config()), 1, steps)
    assert trace == [
        (0, 1, Reason.AT_MIN_REPLICAS),
        (1, 1, Reason.WITHIN_TOLERANCE),  # 8 / 8: on target
        (2, 2, Reason.SCALE_UP),  # 9 / 8 = 1.125 leaves the 10 % band → ceil(1.125) = 2
        (3, 2, Reason.WITHIN_TOLERANCE),  # 12 / 2 = 6 per replica: ratio 0.75, but ceil(1.5) = 2
        (4, 2, Reason.WITHIN_TOLERANCE),  # 17 / 16 = 1.0625: inside the band
        (5, 3, Reason.SCALE_UP),  # 20 / 16 = 1.25 → ceil(2.5) = 3
        (6, 3, Reason.WITHIN_TOLERANCE),  # 25 / 24 = 1.04
        (7, 5, Reason.SCALE_UP),  # 33 / 24 = 1.375 → ceil(4.125) = 5
    ]


def test_noise_within_the_tolerance_band_never_changes_the_size() -> None:
    # 3 replicas at target 8 → 24 waiting is on target; ±10 % is 21.6 … 26.4.
    noise = [24, 22, 26, 23, 25, 22, 26, 24]
    trace = drive(ScalingPolicy(config()), 3, [(t, waiting(w)) for t, w in enumerate(noise)])
    assert {replicas for _, replicas, _ in trace} == {3}
    assert {reason for *_, reason in trace} == {Reason.WITHIN_TOLERANCE}


def test_drop_to_zero_load_scales_down_only_after_the_window_and_not_below_min() -> None:
    policy = ScalingPolicy(config(scale_down_stabilization_s=30))
    steps = [(0, waiting(40)), *[(t, waiting(0, running=0)) for t in (10, 20, 29, 30, 40)]]
    trace = drive(policy, 5, steps)
    assert trace == [
        (0, 5, Reason.WITHIN_TOLERANCE),
        (10, 5, Reason.DOWN_STABILIZATION),
        (20, 5, Reason.DOWN_STABILIZATION),
        (29, 5, Reason.DOWN_STABILIZATION),  # the t=0 recommendation (5) is still in (-1, 29]
        (30, 1, Reason.SCALE_DOWN),  # (0, 30] holds only recommendations of 1
        (40, 1, Reason.AT_MIN_REPLICAS),
    ]


def test_scale_down_takes_the_highest_recommendation_of_the_window() -> None:
    policy = ScalingPolicy(config(scale_down_stabilization_s=10))
    # Recommendations: t=0 → 6, t=1 → 4 (32/6 per replica), t=5 → 2, t=10 → 2 (16/6).
    steps = [
        (0, waiting(48)),
        (1, waiting(32)),
        (5, waiting(16)),
        (10, waiting(16)),
        (16, waiting(16)),
    ]
    trace = drive(policy, 6, steps)
    # t=10: (0, 10] holds 4, 2, 2 → 4; t=16: (6, 16] holds 2, 2 → 2.
    assert [replicas for _, replicas, _ in trace] == [6, 6, 6, 4, 2]


def test_scale_up_window_takes_the_lowest_recommendation() -> None:
    policy = ScalingPolicy(config(scale_up_stabilization_s=5))
    steps = [
        (0, waiting(8)),
        (1, waiting(40)),
        (3, waiting(40)),
        (6, waiting(40)),
        (7, waiting(40)),
    ]
    trace = drive(policy, 1, steps)
    assert trace == [
        (0, 1, Reason.WITHIN_TOLERANCE),
        (1, 1, Reason.UP_STABILIZATION),  # the t=0 recommendation (1) is in the window
        (3, 1, Reason.UP_STABILIZATION),
        (6, 5, Reason.SCALE_UP),  # window (1 … 6] holds only recommendations of 5
        (7, 5, Reason.WITHIN_TOLERANCE),
    ]


def test_step_limits_bound_each_decision() -> None:
    policy = ScalingPolicy(
        config(scale_up_max_step=2, scale_down_max_step=1, scale_down_stabilization_s=0)
    )
    steps = [(t, waiting(200)) for t in range(3)] + [(t, waiting(0)) for t in range(3, 7)]
    trace = drive(policy, 1, steps)
    assert [replicas for _, replicas, _ in trace] == [3, 5, 6, 5, 4, 3, 2]


def test_loading_replicas_count_as_capacity_but_never_trigger_scale_down() -> None:
    # 1 → 4 replicas; the three new ones load for 3 evaluations with empty queues while the
    # burst drains on the first replica: the new replicas' emptiness must not scale down.
    policy = ScalingPolicy(config(scale_down_stabilization_s=0))
    steps = [
        (0, waiting(32)),
        (1, waiting(12)),
        (2, waiting(12)),
        (3, waiting(12)),
        (4, waiting(12)),
    ]
    trace = drive(policy, 1, steps, loading_for=3)
    assert trace == [
        (0, 4, Reason.SCALE_UP),
        (1, 4, Reason.REPLICAS_LOADING),  # all ready: 12/4 = 3 per replica → would be 2
        (2, 4, Reason.REPLICAS_LOADING),
        (3, 4, Reason.REPLICAS_LOADING),
        (4, 2, Reason.SCALE_DOWN),  # all ready now: ceil(4 × 3 / 8) = 2
    ]


def test_loading_replicas_are_capacity_when_scaling_up() -> None:
    # 4 replicas of which 2 still load, 40 waiting: 40 / 4 = 10 per replica → 5, not 40 / 2 → 10.
    decision = ScalingPolicy(config(max_replicas=20)).decide(0, 4, 2, waiting(40))
    assert (decision.replicas, decision.reason) == (5, Reason.SCALE_UP)


def test_prometheus_errors_hold_the_size_and_recovery_resumes_scaling() -> None:
    policy = ScalingPolicy(config(scale_down_stabilization_s=0))
    failure = MetricFailure("SeveralSeries", "query returned 2 series")
    steps = [(0, waiting(16)), (1, UNREACHABLE), (2, failure), (3, waiting(0)), (4, waiting(40))]
    trace = drive(policy, 2, steps)
    assert trace == [
        (0, 2, Reason.WITHIN_TOLERANCE),
        (1, 2, "PrometheusUnreachable"),
        (2, 2, "SeveralSeries"),
        (3, 1, Reason.SCALE_DOWN),
        (4, 5, Reason.SCALE_UP),
    ]
    held = policy.decide(5, 5, 5, UNREACHABLE)
    assert not held.scaling_active and held.replicas == 5 and "connection refused" in held.message


def test_min_zero_without_idle_window_never_scales_to_zero() -> None:
    policy = ScalingPolicy(config(min_replicas=0, scale_down_stabilization_s=0))
    trace = drive(policy, 2, [(t, waiting(0, running=0)) for t in range(0, 600, 60)])
    assert {replicas for _, replicas, _ in trace} == {1}


def test_scale_to_zero_after_the_idle_window_and_back_on_the_first_request() -> None:
    policy = ScalingPolicy(config(min_replicas=0, idle_window_s=60, scale_down_stabilization_s=0))
    steps = [
        (0, waiting(0, running=2)),  # still running a request: not idle
        (10, waiting(0, running=0)),  # idle since 10
        (40, waiting(0, running=0)),
        (69, waiting(0, running=0)),
        (70, waiting(0, running=0)),  # 60 s idle → zero
        (80, waiting(0, running=0)),
        (90, waiting(1, running=0)),  # first queued request
        (91, waiting(20, running=0)),
    ]
    trace = drive(policy, 2, steps)
    assert trace == [
        (0, 1, Reason.SCALE_DOWN),
        (10, 1, Reason.AT_MIN_REPLICAS),
        (40, 1, Reason.AT_MIN_REPLICAS),
        (69, 1, Reason.AT_MIN_REPLICAS),
        (70, 0, Reason.SCALE_TO_ZERO),
        (80, 0, Reason.IDLE_AT_ZERO),
        (90, 1, Reason.SCALE_FROM_ZERO),
        (91, 3, Reason.SCALE_UP),
    ]


def test_unknown_running_count_or_a_prometheus_gap_restarts_the_idle_clock() -> None:
    policy = ScalingPolicy(config(min_replicas=0, idle_window_s=60, scale_down_stabilization_s=0))
    steps = [
        (0, waiting(0, running=0)),
        (50, UNREACHABLE),  # unseen time is not idle time
        (70, waiting(0, running=0)),
        (100, waiting(0, running=None)),  # running count unreadable: not provably idle
        (130, waiting(0, running=0)),
        (189, waiting(0, running=0)),
        (190, waiting(0, running=0)),
    ]
    assert [replicas for _, replicas, _ in drive(policy, 1, steps)] == [1, 1, 1, 1, 1, 1, 0]


def test_scale_from_zero_respects_max_and_the_up_step() -> None:
    assert ScalingPolicy(config(min_replicas=0)).decide(0, 0, 0, waiting(100)).replicas == 6
    limited = ScalingPolicy(config(min_replicas=0, scale_up_max_step=2))
    assert limited.decide(0, 0, 0, waiting(100)).replicas == 2


def test_zero_without_scale_to_zero_goes_back_to_the_minimum() -> None:
    # Someone ran `kubectl scale --replicas 0` while minReplicas is 2 and there is no idle window.
    decision = ScalingPolicy(config(min_replicas=2)).decide(0, 0, 0, waiting(0, running=0))
    assert (decision.replicas, decision.reason) == (2, Reason.SCALE_FROM_ZERO)


def test_a_restarted_policy_waits_a_full_window_before_scaling_down() -> None:
    policy = ScalingPolicy(config(scale_down_stabilization_s=30))
    trace = drive(policy, 4, [(100, waiting(0)), (129, waiting(0)), (131, waiting(0))])
    assert [replicas for _, replicas, _ in trace] == [4, 4, 1]


def test_size_outside_the_bounds_is_brought_back_inside() -> None:
    policy = ScalingPolicy(config(max_replicas=3, scale_down_stabilization_s=0))
    assert policy.decide(0, 8, 8, waiting(64)).replicas == 3


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"min_replicas": -1}, "min_replicas"),
        ({"min_replicas": 4, "max_replicas": 3}, "max_replicas"),
        ({"target_queue_per_replica": 0}, "target_queue_per_replica"),
        ({"tolerance": 1.5}, "tolerance"),
        ({"scale_down_stabilization_s": -1}, "stabilization"),
        ({"scale_up_max_step": 0}, "scale_up_max_step"),
        ({"idle_window_s": -5}, "idle_window_s"),
    ],
)
def test_bad_configuration_is_rejected_with_the_field_named(
    overrides: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        config(**overrides)


def test_garbage_samples_hold_the_size_with_a_reason() -> None:
    policy = ScalingPolicy(config())
    for value in (float("nan"), float("inf"), float("-inf"), -1.0):
        for sample in (QueueSample(waiting=value), QueueSample(waiting=1, running=value)):
            decision = policy.decide(0, 2, 2, sample)
            assert (decision.replicas, decision.scaling_active) == (2, False)
            assert decision.reason == Reason.INVALID_METRIC
    with pytest.raises(ValueError, match="replica counts"):
        policy.decide(0, -1, 0, waiting(1))


@pytest.mark.parametrize("target", [1e-320, 5e-324, 1e-300])
@pytest.mark.parametrize("current", [0, 1, 3])
def test_a_ratio_that_overflows_holds_the_size_with_a_reason(target: float, current: int) -> None:
    """A subnormal target (or a huge answer) makes waiting/target infinite: held, not a crash."""
    policy = ScalingPolicy(
        config(target_queue_per_replica=target, min_replicas=0, idle_window_s=60)
    )
    for waiting_now in (5.0, 1e308):
        decision = policy.decide(0, current, current, waiting(waiting_now))
        assert (decision.replicas, decision.scaling_active) == (current, False)
        assert decision.reason == Reason.UNREPRESENTABLE_LOAD
    assert policy.decide(0, current, current, waiting(0)).scaling_active


@pytest.mark.parametrize("target", [float("nan"), float("inf")])
def test_a_target_that_is_no_number_is_refused(target: float) -> None:
    with pytest.raises(ValueError, match="target_queue_per_replica"):
        config(target_queue_per_replica=target)
