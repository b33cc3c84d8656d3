"""The reconcile queue's order and per-object serialisation, and the no-op comparison of children."""

from __future__ import annotations

import asyncio

from grokserve.operator.cache import ObjectCache, annotated, holds
from grokserve.operator.workqueue import ReconcileQueue


async def drain(queue: ReconcileQueue) -> list[tuple[str, str]]:
    taken = []
    while queue.depth:
        key = await queue.take()
        queue.done(key)
        taken.append(key)
    return taken


def test_a_burst_is_worked_off_in_order_once_per_object_and_status_refreshes_go_first() -> None:
    async def scenario() -> list[tuple[str, str]]:
        queue = ReconcileQueue()
        for i in range(5):
            queue.add(("ns", f"gd-{i}"))
        queue.add(("ns", "gd-1"))  # queued already: stays in its place
        queue.add(("ns", "gd-3"), urgent=True)  # KubeRay reported: its status goes first
        return await drain(queue)

    assert asyncio.run(scenario()) == [("ns", f"gd-{i}") for i in (3, 0, 1, 2, 4)]


def test_an_object_changed_during_its_pass_is_passed_again_after_it_never_alongside() -> None:
    async def scenario() -> None:
        queue = ReconcileQueue()
        queue.add(("ns", "a"))
        key = await queue.take()
        queue.add(("ns", "a"))  # an event while its pass runs
        assert queue.depth == 0  # not takeable by another worker meanwhile
        queue.done(key)
        assert await queue.take() == ("ns", "a")

    asyncio.run(scenario())


def test_a_failed_pass_is_retried_after_a_backoff_that_doubles() -> None:
    async def scenario() -> list[float | None]:
        queue = ReconcileQueue()
        queue.add(("ns", "a"))
        delays = []
        for _ in range(3):
            key = await queue.take()
            delays.append(queue.done(key, failed=True))
            queue.add(key)  # an event while it backs off: it waits for the retry
            assert queue.depth == 0
            queue._retry(key)  # the retry timer firing (without waiting for it)
        queue.forget(("ns", "a"))
        return delays

    assert asyncio.run(scenario()) == [5.0, 10.0, 20.0]


def test_a_look_again_later_comes_once_at_the_first_time_planned_and_not_after_a_delete() -> None:
    async def scenario() -> None:
        queue = ReconcileQueue()
        queue.add_after(("ns", "a"), 0.05)
        queue.add_after(("ns", "a"), 10)  # planned already: the earlier look stands
        assert queue.depth == 0
        assert await asyncio.wait_for(queue.take(), timeout=1) == ("ns", "a")
        queue.done(("ns", "a"))
        queue.add_after(("ns", "b"), 0.05)
        queue.forget(("ns", "b"))  # deleted meanwhile: no look
        await asyncio.sleep(0.1)
        assert queue.depth == 0

    asyncio.run(scenario())


def test_a_child_holds_what_is_applied_when_it_has_every_field_with_its_value() -> None:
    desired = annotated(
        {
            "kind": "Service",
            "metadata": {"name": "a", "namespace": "ns", "labels": {"x": "1"}},
            "spec": {"ports": [{"name": "http", "port": 8000}]},
        }
    )
    observed = {
        **desired,
        "metadata": {**desired["metadata"], "resourceVersion": "7", "uid": "u"},
        "spec": {"ports": [{"name": "http", "port": 8000, "protocol": "TCP"}], "type": "ClusterIP"},
    }
    assert holds(observed, desired)  # defaults and server fields added: nothing to write
    assert not holds({**observed, "spec": {"ports": [{"name": "http", "port": 9}]}}, desired)
    two_ports = {"ports": [*observed["spec"]["ports"], {"name": "m", "port": 8080}]}
    assert not holds({**observed, "spec": two_ports}, desired)
    # The same fields, but applied from another configuration (one with a field since removed).
    earlier = annotated({**desired, "spec": {**desired["spec"], "sessionAffinity": "ClientIP"}})
    assert not holds({**observed, "metadata": earlier["metadata"]}, desired)


def test_the_cache_keeps_the_newest_version_seen() -> None:
    cache = ObjectCache()
    newer = {
        "kind": "Service",
        "metadata": {"name": "a", "namespace": "ns", "resourceVersion": "9"},
    }
    assert cache.put(newer)
    assert not cache.put(newer)  # the watch event echoing our own write
    older = {**newer, "metadata": {**newer["metadata"], "resourceVersion": "8"}}
    assert not cache.put(older)
    assert cache.get("Service", "ns", "a") is newer
