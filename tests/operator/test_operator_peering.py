"""Which kopf peer is active, read from the peering object's status as kopf reads it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from grokserve.operator.peering import is_active


def peer(priority: int, seconds_ago: float = 0, lifetime: int = 60) -> dict:
    lastseen = (datetime.now(UTC) - timedelta(seconds=seconds_ago)).isoformat()
    return {"priority": priority, "lastseen": lastseen, "lifetime": lifetime}


def test_the_highest_live_priority_is_active() -> None:
    assert is_active({"me": peer(200), "other": peer(100)}, "me", 200)
    assert not is_active({"me": peer(100), "other": peer(200)}, "me", 100)


def test_a_dead_peer_does_not_count_and_an_equal_one_pauses_both() -> None:
    assert is_active({"me": peer(100), "gone": peer(200, seconds_ago=61)}, "me", 100)
    assert not is_active({"me": peer(100), "twin": peer(100)}, "me", 100)


def test_not_yet_announced_is_not_active() -> None:
    assert not is_active({"other": peer(1)}, "me", 100)
