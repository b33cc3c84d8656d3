"""What one replica of a GrokDeployment runs: its typed serving config and the planner's verdict.

The operator renders this config into the RayService (the replica's `build_app` parses the same
object) and plans it before creating or changing any child, so a replica that cannot fit its GPUs
is refused here, not found failing inside the cluster.
"""

from __future__ import annotations

from pydantic import ValidationError

from grokserve.model.placement import PlacementError, Plan
from grokserve.operator.spec import GrokDeploymentSpec, SpecError
from grokserve.serving.config import (
    ReplicaModel,
    ReplicaParallelism,
    ReplicaResources,
    ServingConfig,
    ServingLimits,
)

DOES_NOT_FIT = "DoesNotFit"
MODEL_MOUNT_ROOT = "/mnt/models"
WEIGHTS_CACHE_MOUNT = "/var/cache/grokserve"  # the node cache volume (spec.model.cache)
REMOTE_SCHEMES = ("s3", "gs", "hf")  # fetched by the pods; pvc:// is mounted, file:// is a path


def claim_and_path(url: str) -> tuple[str, str]:
    claim, _, path = url.removeprefix("pvc://").partition("/")
    return claim, path


def local_location(url: str | None) -> str | None:
    """Where a model file is inside the Ray pods: pvc:// claims are mounted, file:// is a path."""
    if url is None:
        return None
    if url.startswith("pvc://"):
        claim, path = claim_and_path(url)
        return f"{MODEL_MOUNT_ROOT}/{claim}/{path}".rstrip("/")
    if url.startswith("file://"):
        return url.removeprefix("file://")
    return url


def fetches_weights(spec: GrokDeploymentSpec) -> bool:
    """Whether the pods fetch the source or tokenizer from an object store (into the cache)."""
    urls = (spec.model.source, spec.model.tokenizer)
    return any(url and url.split("://", 1)[0] in REMOTE_SCHEMES for url in urls)


def replica_config(name: str, spec: GrokDeploymentSpec) -> ServingConfig:
    """The arguments of `build_app` for this deployment, as the typed config the replica parses."""
    par = spec.parallelism
    on_gpu = par.device == "gpu"
    return ServingConfig(
        name=name,
        replicas=spec.replicas,
        model=ReplicaModel(
            preset=spec.model.preset,
            source=local_location(spec.model.source),
            tokenizer=local_location(spec.model.tokenizer),
            cache_dir=WEIGHTS_CACHE_MOUNT if fetches_weights(spec) else None,
            dtype=spec.model.dtype,
            quantization=spec.model.quantization,
        ),
        parallelism=ReplicaParallelism(
            gpus_per_node=par.gpus_per_node,
            nodes_per_replica=par.nodes_per_replica,
            gpu_memory=par.gpu_memory,
            tensor=par.tensor,
            expert=par.expert,
            strategy=par.strategy,
        ),
        resources=ReplicaResources(
            device="cuda" if on_gpu else "cpu", accelerator_resource="GPU" if on_gpu else None
        ),
        serving=ServingLimits(
            max_batch_size=spec.serving.max_batch_size,
            max_sequence_length=spec.max_sequence_length,
            max_queued_requests=spec.serving.max_queued_requests,
        ),
    )


def replica_plan(name: str, spec: GrokDeploymentSpec) -> Plan:
    """The plan of one replica, with the preset's model; SpecError (DoesNotFit) when it cannot fit."""
    try:
        config = replica_config(name, spec)
    except ValidationError as error:
        # The spec's own checks should leave nothing for the replica's config to refuse; if they
        # ever do, the user still gets a condition naming the field instead of a retry loop.
        raise SpecError(f"the replica's serving config refuses this spec: {error}") from None
    try:
        return config.plan(spec.model.config)
    except PlacementError as error:
        raise SpecError(str(error), reason=DOES_NOT_FIT) from None
