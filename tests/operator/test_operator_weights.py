"""Remote weights in the cluster: the cache volume and credentials the Ray pods get, as
`grokserve render` shows them, and the cache fields refused when they contradict each other."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from grokserve.operator.builders import WEIGHTS_CACHE_MOUNT, Owner, build_rayservice, serving_args
from grokserve.operator.spec import SpecError, parse_resource, parse_spec
from grokserve.serving.config import ServingConfig

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = yaml.safe_load((REPO / "manifests/examples/grok-1-from-s3.yaml").read_text())
OWNER = Owner(name="grok-1-s3", namespace="llm", uid="0b7c5f0e-1d2a-4c2e-9d35-2b8f3f7a9c11")


def with_model(**model: object) -> dict:
    body = copy.deepcopy(EXAMPLE)
    body["spec"]["model"] |= model
    return body


def pods(body: dict) -> list[dict]:
    cluster = build_rayservice(OWNER, parse_spec(body["spec"]))["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    return [group["template"]["spec"] for group in groups]


@pytest.mark.parametrize(
    ("cache", "volume"),
    [
        (
            {"type": "hostPath", "path": "/mnt/nvme/grokserve-cache"},
            {"hostPath": {"path": "/mnt/nvme/grokserve-cache", "type": "DirectoryOrCreate"}},
        ),
        (
            {"type": "pvc", "claim": "weights-cache"},
            {"persistentVolumeClaim": {"claimName": "weights-cache"}},
        ),
        ({"type": "emptyDir", "sizeLimit": "400Gi"}, {"emptyDir": {"sizeLimit": "400Gi"}}),
        ({}, {"emptyDir": {}}),
    ],
)
def test_every_ray_pod_mounts_the_cache_and_gets_the_credentials(cache: dict, volume: dict) -> None:
    body = with_model(cache=cache)
    for pod in pods(body):
        [container] = pod["containers"]
        assert {"name": "weights-cache", **volume} in pod["volumes"]
        assert {"name": "weights-cache", "mountPath": WEIGHTS_CACHE_MOUNT} in container[
            "volumeMounts"
        ]
        assert container["envFrom"] == [{"secretRef": {"name": "grok-weights-s3"}}]
    args = serving_args(OWNER, parse_spec(body["spec"]))
    assert args["model"]["source"] == "s3://models/xai-org/grok-1/ckpt-0"
    assert ServingConfig.from_args(args).model.cache_dir == WEIGHTS_CACHE_MOUNT


def test_mounted_sources_need_no_cache_but_keep_the_credentials() -> None:
    body = with_model(source="pvc://grok-weights/ckpt-0", tokenizer=None)
    for pod in pods(body):
        assert all(v["name"] != "weights-cache" for v in pod.get("volumes", []))
        assert pod["containers"][0]["envFrom"] == [{"secretRef": {"name": "grok-weights-s3"}}]
    assert serving_args(OWNER, parse_spec(body["spec"]))["model"].get("cacheDir") is None


@pytest.mark.parametrize(
    ("cache", "message"),
    [
        ({"type": "hostPath"}, "model.cache.path is required with type hostPath"),
        ({"type": "pvc", "path": "/x", "claim": "c"}, "model.cache.path is required with type"),
        ({"type": "pvc"}, "model.cache.claim is required with type pvc"),
        ({"type": "hostPath", "path": "/x", "sizeLimit": "1Gi"}, "model.cache.sizeLimit applies"),
    ],
)
def test_contradicting_cache_fields_are_refused_naming_them(cache: dict, message: str) -> None:
    body = {**with_model(cache=cache), "metadata": EXAMPLE["metadata"]}
    with pytest.raises(SpecError, match=message):
        parse_resource(body)
