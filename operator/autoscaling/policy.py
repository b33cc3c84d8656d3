"""The autoscaling policy: queue depth in, replica count out (HPA semantics, see docs/autoscaling.md).

Pure and deterministic: every input is a plain value and the clock is an argument, so that tests drive
it with canned time sequences. The only state is what the HPA keeps too: the recent recommendations
(for the stabilization windows) and since when the deployment has been idle (for scale-to-zero).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from enum import StrEnum


class Reason(StrEnum):
    """Why a decision came out as it did; written to status, Events and metrics."""

    SCALE_UP = "ScaleUp"
    SCALE_DOWN = "ScaleDown"
    SCALE_FROM_ZERO = "ScaleFromZero"
    SCALE_TO_ZERO = "ScaleToZero"
    WITHIN_TOLERANCE = "WithinTolerance"
    UP_STABILIZATION = "ScaleUpStabilization"
    DOWN_STABILIZATION = "ScaleDownStabilization"
    REPLICAS_LOADING = "ReplicasLoading"
    AT_MAX_REPLICAS = "AtMaxReplicas"
    AT_MIN_REPLICAS = "AtMinReplicas"
    IDLE_AT_ZERO = "IdleAtZero"
    # Held: the numbers cannot be acted on (a NaN or infinite sample, a load/target ratio that
    # overflows, e.g. with a target of 1e-320).
    INVALID_METRIC = "InvalidMetric"
    UNREPRESENTABLE_LOAD = "UnrepresentableLoad"


@dataclass(frozen=True)
class PolicyConfig:
    """The knobs of one GrokDeployment's autoscaler, in plain units (seconds, replicas)."""

    min_replicas: int
    max_replicas: int
    target_queue_per_replica: float
    tolerance: float = 0.1
    scale_up_stabilization_s: float = 0.0
    scale_down_stabilization_s: float = 300.0
    # At most this many replicas added / removed by one decision; None means no limit.
    scale_up_max_step: int | None = None
    scale_down_max_step: int | None = None
    # Scale to zero only after this long with nothing waiting or running; None: never to zero.
    idle_window_s: float | None = None

    def __post_init__(self) -> None:
        if self.min_replicas < 0:
            raise ValueError(f"min_replicas must be >= 0, got {self.min_replicas}")
        if self.max_replicas < max(self.min_replicas, 1):
            raise ValueError(
                f"max_replicas must be >= max(min_replicas, 1), got min={self.min_replicas} "
                f"max={self.max_replicas}"
            )
        if not 0 < self.target_queue_per_replica < math.inf:
            raise ValueError(
                f"target_queue_per_replica must be > 0, got {self.target_queue_per_replica}"
            )
        if not 0 <= self.tolerance <= 1:  # NaN fails too
            raise ValueError(f"tolerance must be in [0, 1], got {self.tolerance}")
        if self.scale_up_stabilization_s < 0 or self.scale_down_stabilization_s < 0:
            raise ValueError("stabilization windows must be >= 0 seconds")
        for name in ("scale_up_max_step", "scale_down_max_step"):
            step = getattr(self, name)
            if step is not None and step < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {step}")
        if self.idle_window_s is not None and self.idle_window_s < 0:
            raise ValueError(f"idle_window_s must be >= 0 or None, got {self.idle_window_s}")

    @property
    def scales_to_zero(self) -> bool:
        """Zero replicas only when asked for twice: minReplicas 0 AND an explicit idle window."""
        return self.min_replicas == 0 and self.idle_window_s is not None

    @property
    def floor(self) -> int:
        """The smallest size an ordinary (non-idle) recommendation may have."""
        return max(self.min_replicas, 1)


@dataclass(frozen=True)
class QueueSample:
    """What Prometheus says about the deployment right now (sums over all its replicas)."""

    waiting: float
    # None when the running count could not be read: then the deployment never counts as idle.
    running: float | None = None


@dataclass(frozen=True)
class MetricFailure:
    """Prometheus could not give a usable number; `reason` is a CamelCase word for the condition."""

    reason: str
    message: str


@dataclass(frozen=True)
class Decision:
    """The outcome of one evaluation. `replicas == current` means: leave spec.replicas alone."""

    current: int
    replicas: int
    reason: str
    message: str
    # False when the metric was unusable and the size is held for that reason.
    scaling_active: bool
    observed_waiting: float | None = None
    observed_per_replica: float | None = None
    # The clamped recommendation before stabilization and step limits (None when not computed).
    recommendation: int | None = None

    @property
    def changes(self) -> bool:
        return self.replicas != self.current


class ScalingPolicy:
    """Turns (time, replica counts, queue sample) into decisions for one GrokDeployment."""

    def __init__(self, config: PolicyConfig) -> None:
        self.config = config
        self._recommendations: deque[tuple[float, int]] = deque()
        self._idle_since: float | None = None
        self._first_seen: tuple[float, int] | None = None

    def decide(
        self, now: float, current: int, ready: int, sample: QueueSample | MetricFailure
    ) -> Decision:
        """Decide the size for `current` replicas of which `ready` are serving (the rest load)."""
        if current < 0 or ready < 0:
            raise ValueError(f"replica counts must be >= 0, got current={current} ready={ready}")
        if isinstance(sample, QueueSample) and not _usable(sample):
            sample = MetricFailure(
                Reason.INVALID_METRIC,
                f"the queue sample must be finite non-negative numbers, got {sample}",
            )
        elif isinstance(sample, QueueSample) and not _representable(
            sample.waiting / self.config.target_queue_per_replica
        ):
            sample = MetricFailure(
                Reason.UNREPRESENTABLE_LOAD,
                f"{sample.waiting:g} waiting against a target of "
                f"{self.config.target_queue_per_replica:g} per replica is not a usable ratio",
            )
        if isinstance(sample, MetricFailure):
            # An unseen stretch of time is not idle time: restart the idle clock.
            self._idle_since = None
            return Decision(
                current=current,
                replicas=current,
                reason=str(sample.reason),
                message=f"holding {current} replicas: {sample.message}",
                scaling_active=False,
            )
        self._track_idle(now, sample)
        if current == 0:
            return self._decide_from_zero(sample)
        if self._idle_long_enough(now):
            self._recommendations.clear()
            return self._decision(
                current,
                0,
                Reason.SCALE_TO_ZERO,
                f"nothing waiting or running for {self.config.idle_window_s:g}s",
                sample,
                None,
                0,
            )
        return self._decide_scaled(now, current, min(ready, current), sample)

    def _decide_scaled(self, now: float, current: int, ready: int, sample: QueueSample) -> Decision:
        config = self.config
        target = config.target_queue_per_replica
        loading = current - ready
        # Loading replicas are capacity (counted in the denominator) but not idle samples: when the
        # load argues for fewer replicas, each loading replica is assumed to be at target, and if
        # that no longer argues for fewer the size is held (the HPA treats unready pods the same
        # way), so that empty new replicas never cause a scale-down.
        per_replica = sample.waiting / current
        raw = self._raw_recommendation(current, per_replica / target)
        held_by_loading = False
        if raw < current and loading > 0:
            per_replica = (sample.waiting + loading * target) / current
            raw = min(self._raw_recommendation(current, per_replica / target), current)
            held_by_loading = raw == current
        recommendation = min(max(raw, config.floor), config.max_replicas)
        self._remember(now, current, recommendation)
        up_bound, down_bound = self._window_bounds(now)
        stabilized = min(max(current, up_bound), down_bound)
        desired = self._limit_step(current, stabilized)
        desired = min(max(desired, config.floor), config.max_replicas)
        observed = sample.waiting / current
        reason, message = self._explain(
            current, recommendation, stabilized, desired, loading, held_by_loading, observed
        )
        return self._decision(current, desired, reason, message, sample, observed, recommendation)

    def _decide_from_zero(self, sample: QueueSample) -> Decision:
        config = self.config
        needed = math.ceil(sample.waiting / config.target_queue_per_replica)
        if not config.scales_to_zero:
            # Zero was set by hand (or scale-to-zero was turned off since): back to the floor.
            needed = max(needed, config.floor)
        if needed == 0:
            return self._decision(0, 0, Reason.IDLE_AT_ZERO, "no requests waiting", sample, None, 0)
        wanted = min(needed, config.max_replicas)
        desired = (
            wanted if config.scale_up_max_step is None else min(wanted, config.scale_up_max_step)
        )
        why = (
            f"{sample.waiting:g} requests waiting with no replica"
            if sample.waiting > 0
            else f"at 0 replicas without scale-to-zero (minimum {config.floor})"
        )
        return self._decision(0, desired, Reason.SCALE_FROM_ZERO, why, sample, None, wanted)

    def _raw_recommendation(self, current: int, ratio: float) -> int:
        if abs(ratio - 1.0) <= self.config.tolerance:
            return current
        return math.ceil(current * ratio)

    def _remember(self, now: float, current: int, recommendation: int) -> None:
        if self._first_seen is None:
            # A (re)started operator has no history: it counts the size it found as a scale-down
            # vote cast now, so that it waits a full scale-down window before shrinking anything.
            self._first_seen = (now, current)
        horizon = max(self.config.scale_up_stabilization_s, self.config.scale_down_stabilization_s)
        while self._recommendations and self._recommendations[0][0] <= now - horizon:
            self._recommendations.popleft()
        self._recommendations.append((now, recommendation))

    def _window_bounds(self, now: float) -> tuple[int, int]:
        """(lowest recommendation over the scale-up window, highest over the scale-down window).

        A window of W seconds holds the recommendations made in (now - W, now], the one made now
        included, so a window of 0 means "this evaluation only".
        """
        up_cutoff = now - self.config.scale_up_stabilization_s
        down_cutoff = now - self.config.scale_down_stabilization_s
        latest = self._recommendations[-1][1]
        up = min([latest, *(r for t, r in self._recommendations if t > up_cutoff)])
        down = max([latest, *(r for t, r in self._recommendations if t > down_cutoff)])
        if self._first_seen is not None and self._first_seen[0] > down_cutoff:
            down = max(down, self._first_seen[1])
        return up, down

    def _limit_step(self, current: int, desired: int) -> int:
        up_step, down_step = self.config.scale_up_max_step, self.config.scale_down_max_step
        if desired > current and up_step is not None:
            return min(desired, current + up_step)
        if desired < current and down_step is not None:
            return max(desired, current - down_step)
        return desired

    def _explain(
        self,
        current: int,
        recommendation: int,
        stabilized: int,
        desired: int,
        loading: int,
        held_by_loading: bool,
        per_replica: float,
    ) -> tuple[Reason, str]:
        config = self.config
        load = (
            f"{per_replica:.3g} waiting per replica against a target of "
            f"{config.target_queue_per_replica:g}"
        )
        if desired > current:
            return Reason.SCALE_UP, f"{load}: {current} -> {desired} (recommended {recommendation})"
        if desired < current:
            return (
                Reason.SCALE_DOWN,
                f"{load}: {current} -> {desired} (recommended {recommendation})",
            )
        ratio = per_replica / config.target_queue_per_replica
        if ratio > 1 + config.tolerance and current >= config.max_replicas:
            return Reason.AT_MAX_REPLICAS, f"{load}: already at maxReplicas {config.max_replicas}"
        if ratio < 1 - config.tolerance and current <= config.floor:
            return Reason.AT_MIN_REPLICAS, f"{load}: already at the minimum {config.floor}"
        if recommendation > current:
            return (
                Reason.UP_STABILIZATION,
                f"{load}: recommended {recommendation} but the scale-up window "
                f"({config.scale_up_stabilization_s:g}s) holds {stabilized}",
            )
        if recommendation < current:
            return (
                Reason.DOWN_STABILIZATION,
                f"{load}: recommended {recommendation} but the scale-down window "
                f"({config.scale_down_stabilization_s:g}s) holds {stabilized}",
            )
        if held_by_loading:
            return Reason.REPLICAS_LOADING, f"{load}: {loading} replicas still loading"
        return Reason.WITHIN_TOLERANCE, f"{load}: within tolerance {config.tolerance:g}"

    def _decision(
        self,
        current: int,
        replicas: int,
        reason: Reason,
        message: str,
        sample: QueueSample,
        per_replica: float | None,
        recommendation: int | None,
    ) -> Decision:
        return Decision(
            current=current,
            replicas=replicas,
            reason=str(reason),
            message=message,
            scaling_active=True,
            observed_waiting=sample.waiting,
            observed_per_replica=per_replica,
            recommendation=recommendation,
        )

    def _track_idle(self, now: float, sample: QueueSample) -> None:
        idle = sample.waiting == 0 and sample.running == 0
        if not idle:
            self._idle_since = None
        elif self._idle_since is None:
            self._idle_since = now

    def _idle_long_enough(self, now: float) -> bool:
        window = self.config.idle_window_s
        return (
            self.config.scales_to_zero
            and window is not None
            and self._idle_since is not None
            and now - self._idle_since >= window
        )


# Beyond this, a replica count is no count (and math.ceil of an infinity raises).
LARGEST_RECOMMENDATION = 1e15


def _usable(sample: QueueSample) -> bool:
    values = [sample.waiting] if sample.running is None else [sample.waiting, sample.running]
    return all(0 <= value < math.inf for value in values)


def _representable(replicas: float) -> bool:
    return 0 <= replicas <= LARGEST_RECOMMENDATION
