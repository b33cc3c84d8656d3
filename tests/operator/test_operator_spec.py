"""The GrokDeployment spec: defaults, cross-field rules and their messages."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from grokserve.operator.spec import SpecError, parse_resource, parse_spec

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "manifests" / "examples").glob("*.yaml"))
GROK1 = {
    "model": {"preset": "grok-1", "source": "pvc://weights/grok-1"},
    "parallelism": {"tensor": 8, "expert": 8},
}


def with_changes(**sections: dict) -> dict:
    spec = copy.deepcopy(GROK1)
    for key, value in sections.items():
        spec[key] = {**spec.get(key, {}), **value} if isinstance(value, dict) else value
    return spec


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_parses(path: Path) -> None:
    for body in yaml.safe_load_all(path.read_text()):
        if body and body.get("kind") == "GrokDeployment":
            parse_resource(body)


def test_defaults_fill_a_minimal_spec() -> None:
    spec = parse_spec({"model": {"preset": "grok-1", "source": "pvc://weights/grok-1"}})
    assert spec.replicas == 1
    assert spec.parallelism.shards == 8
    assert (spec.parallelism.tensor, spec.parallelism.expert) == (None, None)
    assert spec.parallelism.gpu_memory_bytes == 80 * 2**30
    assert spec.max_sequence_length == 8192
    assert spec.autoscaling.enabled is False
    assert spec.ray.upgrade_strategy == "NewCluster"


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (
            with_changes(parallelism={"tensor": 3}),
            "spec.parallelism: parallelism.tensor must divide gpusPerNode × nodesPerReplica "
            "(here gpusPerNode=8, nodesPerReplica=1, tensor=3)",
        ),
        (
            with_changes(parallelism={"tensor": 16, "nodesPerReplica": 2}),
            "parallelism.tensor must divide the model's kv heads (grok-1: 8, grok-tiny: 4, "
            "grok-mini: 4) (here model.preset=grok-1, parallelism.tensor=16, the model's kv "
            "heads=8)",
        ),
        (
            with_changes(parallelism={"expert": 16, "nodesPerReplica": 2}),
            "parallelism.expert must divide the model's experts",
        ),
        (
            with_changes(serving={"maxSequenceLength": 9000}),
            "serving.maxSequenceLength must not exceed the model's context (grok-1: 8192, "
            "grok-tiny: 1024, grok-mini: 1024) (here serving.maxSequenceLength=9000",
        ),
        (
            with_changes(model={"source": None}),
            "spec.model: model.source is required for grok-1",
        ),
        (
            with_changes(parallelism={"gpuMemory": "80"}),
            "spec.parallelism.gpuMemory: String should match pattern",
        ),
        (
            with_changes(parallelism={"gpuMemory": "0Gi"}),
            "spec.parallelism.gpuMemory: parallelism.gpuMemory must be positive, got '0Gi'",
        ),
        (
            with_changes(autoscaling={"minReplicas": 3, "maxReplicas": 2}),
            "spec.autoscaling: autoscaling.minReplicas must be ≤ autoscaling.maxReplicas (here "
            "minReplicas=3, maxReplicas=2)",
        ),
        (
            with_changes(autoscaling={"enabled": True, "maxReplicas": 2}),
            "spec.autoscaling: autoscaling.prometheusUrl is required",
        ),
        (
            with_changes(autoscaling={"minReplicas": 0}),
            "minReplicas 0 needs autoscaling.scaleToZeroIdleSeconds",
        ),
        (
            with_changes(
                replicas=5,
                autoscaling={"enabled": True, "maxReplicas": 4, "prometheusUrl": "http://p:9090"},
            ),
            "replicas must lie within autoscaling.minReplicas..maxReplicas while autoscaling is "
            "enabled (here autoscaling.enabled=True, replicas=5, autoscaling.minReplicas=1, "
            "autoscaling.maxReplicas=4)",
        ),
        (with_changes(model={"preset": "grok-2"}), "spec.model.preset: Input should be 'grok-1'"),
        (with_changes(model={"source": "ftp://x"}), "spec.model.source: String should match"),
        # No loader builds a float16 model: refused here, not when the replica starts.
        (
            with_changes(model={"dtype": "float16"}),
            "spec.model.dtype: Input should be 'bfloat16' or 'float32'",
        ),
        (with_changes(replicas=-1), "spec.replicas: Input should be greater than or equal to 0"),
        (
            with_changes(ray={"upgradeStrategy": "NewClusterWithIncrementalUpgrade"}),
            "spec.ray.upgradeStrategy: Input should be 'NewCluster' or 'None'",
        ),
        (with_changes(modell={"preset": "grok-1"}), "spec.modell: Extra inputs are not permitted"),
        ({"parallelism": {}}, "spec.model: Field required"),
        ("grok-1", "spec must be a mapping, got str"),
    ],
)
def test_invalid_specs_name_the_field(spec: object, expected: str) -> None:
    with pytest.raises(SpecError) as caught:
        parse_spec(spec)
    assert expected in caught.value.message
    assert caught.value.reason == "InvalidSpec"


def test_wrong_kind_is_refused() -> None:
    with pytest.raises(SpecError, match="expected apiVersion grokserve.io/v1alpha1"):
        parse_resource(
            {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}, "spec": GROK1}
        )


def test_random_weights_stay_available_for_the_small_presets() -> None:
    for name in ("grok-tiny", "grok-mini"):
        assert parse_spec({"model": {"preset": name}}).model.source is None


@pytest.mark.parametrize("name", ["Grok", "1grok", "grok_1", "g" * 41, ""])
def test_names_that_cannot_name_the_children_are_refused(name: str) -> None:
    body = {
        "apiVersion": "grokserve.io/v1alpha1",
        "kind": "GrokDeployment",
        "metadata": {"name": name},
        "spec": GROK1,
    }
    with pytest.raises(SpecError) as caught:
        parse_resource(body)
    assert caught.value.reason == "InvalidName"
    assert "metadata.name" in caught.value.message
