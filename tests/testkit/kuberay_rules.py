"""KubeRay's rule for what a RayService change does to the running Ray cluster, ported from Go.

ray-project/kuberay, ray-operator/controllers/ray (v1.3 to v1.7):

- `utils.GenerateHashWithoutReplicasAndWorkersToDelete`: sha1 (base32hex) of the JSON of
  `spec.rayClusterConfig` with every worker group's `replicas`, `minReplicas`, `maxReplicas` and
  `scaleStrategy.workersToDelete` muted, and (v1.5+) the cluster's own `upgradeStrategy`: the
  Ray autoscaler writes those, so a change to them alone is no change. KubeRay stores the hash on
  the RayCluster it creates.
- `rayservice_controller.shouldUpdateCluster` / `shouldPrepareNewCluster` /
  `isClusterSpecHashEqual`: equal hash -> nothing happens to the cluster; equal hash of the first
  N worker groups with groups appended -> the cluster is updated in place; anything else -> a new
  cluster when `upgradeStrategy.type` is NewCluster (or unset, with ENABLE_ZERO_DOWNTIME not
  false), else nothing.
- `checkIfNeedSubmitServeApplications`: a `serveConfigV2` other than the one last submitted is
  submitted to the cluster's dashboard (in place; to the new cluster during an upgrade).
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
from dataclasses import dataclass
from typing import Any, Literal

ClusterEffect = Literal["unchanged", "updated-in-place", "new-cluster", "ignored"]


def cluster_hash(cluster_spec: dict[str, Any]) -> str:
    muted = copy.deepcopy(cluster_spec)
    for group in muted.get("workerGroupSpecs") or []:
        for field in ("replicas", "minReplicas", "maxReplicas"):
            group.pop(field, None)
        # A Go struct, not a pointer: it marshals as {} whether it was given or not.
        strategy = group.get("scaleStrategy") or {}
        group["scaleStrategy"] = {k: v for k, v in strategy.items() if k != "workersToDelete"}
    muted.pop("upgradeStrategy", None)
    serial = json.dumps(muted, sort_keys=True, separators=(",", ":")).encode()
    return base64.b32hexencode(hashlib.sha1(serial).digest()).decode()


def _zero_downtime(rayservice_spec: dict[str, Any]) -> bool:
    kind = (rayservice_spec.get("upgradeStrategy") or {}).get("type")
    return kind is None or kind in ("NewCluster", "NewClusterWithIncrementalUpgrade")


def cluster_effect(running: dict[str, Any], goal: dict[str, Any]) -> ClusterEffect:
    """What KubeRay does to a cluster made from RayService spec `running` when the RayService's
    spec becomes `goal`."""
    made, wanted = running["rayClusterConfig"], goal["rayClusterConfig"]
    if cluster_hash(made) == cluster_hash(wanted):
        return "unchanged"
    groups = len(made.get("workerGroupSpecs") or [])
    if len(wanted.get("workerGroupSpecs") or []) >= groups:
        head = {**wanted, "workerGroupSpecs": wanted["workerGroupSpecs"][:groups]}
        if cluster_hash(made) == cluster_hash(head):
            return "updated-in-place"
    return "new-cluster" if _zero_downtime(goal) else "ignored"


@dataclass(frozen=True)
class Outcome:
    cluster: ClusterEffect
    serve_config_submitted: bool
    # The cluster spec that runs once KubeRay is done (the hash-muted fields as they were made).
    running_cluster: dict[str, Any]


def apply_change(running: dict[str, Any], goal: dict[str, Any]) -> Outcome:
    effect = cluster_effect(running, goal)
    runs = {
        "unchanged": running["rayClusterConfig"],
        "ignored": running["rayClusterConfig"],
        "updated-in-place": goal["rayClusterConfig"],
        "new-cluster": goal["rayClusterConfig"],
    }[effect]
    # The Serve config reaches whichever cluster serves: in place, or the new one.
    submitted = effect == "new-cluster" or running["serveConfigV2"] != goal["serveConfigV2"]
    return Outcome(effect, submitted, runs)
