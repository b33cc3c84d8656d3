"""Which GrokDeployments wait for a reconcile pass, in which order (asyncio, one event loop).

A key is queued once however many events name it; a key queued while its pass runs is queued again
when the pass ends, so passes over one object never overlap and the last change is always seen.
Keys are taken in the order they were queued, urgent ones (a child's status changed: a status
write, not a burst of creations, waits for them) first. A failed pass is retried after a backoff
that doubles up to a limit; events meanwhile wait for the retry, which sees the latest state.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable

from grokserve.operator import metrics

Key = tuple[str, str]  # namespace, name
RETRY_FIRST_S, RETRY_MAX_S = 5.0, 300.0
EMPTY_RECHECK_S = 5.0


class ReconcileQueue:
    def __init__(self) -> None:
        # dicts as ordered sets: first queued, first taken
        self._urgent: dict[Key, None] = {}
        self._normal: dict[Key, None] = {}
        self._active: set[Key] = set()
        self._again: dict[Key, bool] = {}  # queued during its pass: urgent or not
        self._failures: dict[Key, int] = {}
        self._retries: dict[Key, asyncio.TimerHandle] = {}
        self._later: dict[Key, asyncio.TimerHandle] = {}
        self._waiting = asyncio.Event()

    @property
    def depth(self) -> int:
        return len(self._urgent) + len(self._normal)

    def _changed(self) -> None:
        metrics.QUEUE_DEPTH.set(self.depth)
        if self.depth:
            self._waiting.set()

    def add(self, key: Key, *, urgent: bool = False) -> None:
        if key in self._retries:
            return  # backing off: the retry comes soon enough and sees the latest state
        if key in self._active:
            self._again[key] = self._again.get(key, False) or urgent
            return
        if urgent and key not in self._urgent:
            self._normal.pop(key, None)
            self._urgent[key] = None
        elif key not in self._urgent:
            self._normal.setdefault(key, None)
        self._changed()

    def forget(self, key: Key) -> None:
        """The object is gone: drop its pending pass and retry."""
        self._urgent.pop(key, None)
        self._normal.pop(key, None)
        self._again.pop(key, None)
        self._failures.pop(key, None)
        for timers in (self._retries, self._later):
            timer = timers.pop(key, None)
            if timer is not None:
                timer.cancel()
        self._changed()

    def add_after(self, key: Key, delay_s: float) -> None:
        """Queue `key` in `delay_s` seconds (to look again at something that changes without an
        event, e.g. weights loading); an earlier look already planned stands."""
        if key in self._later:
            return
        loop = asyncio.get_running_loop()
        self._later[key] = loop.call_later(delay_s, self._look_again, key)

    def _look_again(self, key: Key) -> None:
        self._later.pop(key, None)
        self.add(key)

    async def take(self) -> Key:
        while not self.depth:
            self._waiting.clear()
            await self._waiting.wait()
        lane = self._urgent or self._normal
        key = next(iter(lane))
        del lane[key]
        self._active.add(key)
        self._changed()
        return key

    def done(self, key: Key, *, failed: bool = False) -> float | None:
        """The pass over `key` ended; returns the seconds until its retry when it failed."""
        self._active.discard(key)
        retry_in = None
        if failed:
            failures = self._failures[key] = self._failures.get(key, 0) + 1
            retry_in = min(RETRY_FIRST_S * 2 ** (failures - 1), RETRY_MAX_S)
        else:
            self._failures.pop(key, None)
        again = self._again.pop(key, None)
        if retry_in is not None:
            loop = asyncio.get_running_loop()
            self._retries[key] = loop.call_later(retry_in, self._retry, key)
        elif again is not None:
            self.add(key, urgent=again)
        return retry_in

    def _retry(self, key: Key) -> None:
        self._retries.pop(key, None)
        self.add(key)


async def resync(queue: ReconcileQueue, keys: Callable[[], list[Key]], period_s: float) -> None:
    """Queue every key once per `period_s`, spread over the period in a new random order each
    round, so that objects created together are not resynced together."""
    while True:
        batch = keys()
        random.shuffle(batch)
        if not batch:  # none yet: look again soon, the first ones need not wait a period
            await asyncio.sleep(min(period_s, EMPTY_RECHECK_S))
            continue
        step = period_s / len(batch)
        for key in batch:
            await asyncio.sleep(step * random.uniform(0.5, 1.5))
            queue.add(key)
