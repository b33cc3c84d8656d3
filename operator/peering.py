"""Whether this operator process is the active one among its kopf peers.

kopf pauses its own handlers, timers and daemons in every peer but the highest-priority live one;
the operator's RayService watch is not kopf's, so it asks this gate before it writes a status.
It reads the peering object kopf keeps (`status`: identity -> priority, lastseen, lifetime), as
kopf itself does, at most every few seconds.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from grokserve.operator.kube import Kube, Resource

CLUSTER_PEERINGS = Resource("kopf.dev", "v1", "clusterkopfpeerings")
NAMESPACED_PEERINGS = Resource("kopf.dev", "v1", "kopfpeerings")
RECHECK_S = 5.0


@dataclass
class PeeringGate:
    kube: Kube
    name: str
    identity: str
    priority: int
    namespace: str | None = None  # None: the ClusterKopfPeering
    _answer: tuple[float, bool] | None = field(default=None, repr=False)

    def active(self) -> bool:
        now = time.monotonic()
        if self._answer is None or now - self._answer[0] > RECHECK_S:
            self._answer = (now, self._read())
        return self._answer[1]

    def _read(self) -> bool:
        resource = CLUSTER_PEERINGS if self.namespace is None else NAMESPACED_PEERINGS
        peering = self.kube.get(resource, self.namespace, self.name) or {}
        return is_active(peering.get("status") or {}, self.identity, self.priority)


def is_active(peers: dict[str, Any], identity: str, priority: int) -> bool:
    """Announced, and no other live peer has this priority or a higher one (kopf pauses all
    peers that share the highest priority)."""
    if identity not in peers:
        return False
    now = datetime.now(UTC)
    for other, info in peers.items():
        if other == identity or not isinstance(info, dict):
            continue
        lastseen = datetime.fromisoformat(str(info.get("lastseen")))
        if lastseen.tzinfo is None:
            lastseen = lastseen.replace(tzinfo=UTC)
        alive = lastseen + timedelta(seconds=int(info.get("lifetime", 60))) > now
        if alive and int(info.get("priority", 0)) >= priority:
            return False
    return True
