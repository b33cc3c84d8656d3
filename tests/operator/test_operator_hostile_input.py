"""Hostile input: every spec bounded, the largest admissible spec fits kopf's annotation, and a
seeded fuzz of invalid GrokDeployments ends each one in a refusal (schema, CEL, or the operator's
Ready=False with a reason), none accepted silently and none crashing the operator's code paths."""

from __future__ import annotations

import copy
import json
import random
import re
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml

pytest.importorskip("celpy", reason="cel-python is not installed")

from grokserve.operator.autoscaling.daemon import policy_config
from grokserve.operator.autoscaling.policy import QueueSample, ScalingPolicy
from grokserve.operator.builders import Owner, build_children
from grokserve.operator.replica import replica_plan
from grokserve.operator.spec import SpecError, check_name, parse_spec
from testkit.crd_cel import apply_defaults, rule_failures
from testkit.kube_schemas import CRD_FILE, grokdeployment_validator, schema_errors

REPO = Path(__file__).resolve().parents[2]
SCHEMA = yaml.safe_load(CRD_FILE.read_text())["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
SPEC_SCHEMA = SCHEMA["properties"]["spec"]
BASE = yaml.safe_load((REPO / "manifests/examples/grok-1-int8-single-node.yaml").read_text())
# kube-apiserver's limit on all of an object's annotations together; kopf keeps the last handled
# spec in one of them.
ANNOTATIONS_LIMIT = 256 * 1024
# What else goes into that annotation and its neighbours: the key, kopf's wrapper, the object's
# own labels (bounded by Kubernetes), kopf's progress annotations.
ANNOTATION_OVERHEAD = 32 * 1024


def _nodes(schema: dict[str, Any], path: str = "spec") -> list[tuple[str, dict[str, Any]]]:
    found = [(path, schema)]
    for name, child in (schema.get("properties") or {}).items():
        found += _nodes(child, f"{path}.{name}")
    for key, suffix in (("items", "[]"), ("additionalProperties", "{}")):
        if isinstance(schema.get(key), dict):
            found += _nodes(schema[key], path + suffix)
    return found


def test_every_string_list_and_map_of_the_spec_is_bounded() -> None:
    unbounded = [
        path
        for path, node in _nodes(SPEC_SCHEMA)
        if (node.get("type") == "string" and "maxLength" not in node)
        or (node.get("type") == "array" and "maxItems" not in node)
        or (isinstance(node.get("additionalProperties"), dict) and "maxProperties" not in node)
    ]
    assert unbounded == []


def _key_bound(node: dict[str, Any]) -> int:
    """Longest key a map admits: its CEL rule's `size(k) <= N`."""
    rules = " ".join(r["rule"] for r in node.get("x-kubernetes-validations", []))
    return int(re.search(r"size\(k\) <= (\d+)", rules).group(1))


def _json_bound(node: dict[str, Any]) -> int:
    """The most bytes the JSON of a value admitted by `node` can take (ASCII-escaped, as kopf
    writes it: up to 12 bytes per character where the pattern admits any character)."""
    if "enum" in node:
        return max(len(json.dumps(value)) for value in node["enum"])
    kind = node.get("type")
    if kind == "string":
        # Any character where the pattern has a wildcard `.` or a negated class; a `.` escaped
        # or inside a class is a dot.
        pattern = re.sub(r"\[[^^\]][^\]]*\]", "", node.get("pattern", ".").replace("\\.", ""))
        any_character = "." in pattern or "[^" in pattern
        return node["maxLength"] * (12 if any_character else 1) + 2
    if kind in ("integer", "number"):
        return 24
    if kind == "boolean":
        return 5
    if kind == "array":
        return node["maxItems"] * (_json_bound(node["items"]) + 1) + 2
    if isinstance(node.get("additionalProperties"), dict):
        entry = _key_bound(node) + 3 + _json_bound(node["additionalProperties"]) + 1
        return node["maxProperties"] * entry + 2
    return 2 + sum(len(name) + 4 + _json_bound(child) for name, child in node["properties"].items())


def test_the_largest_admissible_spec_fits_kopfs_annotation() -> None:
    """kopf stores the last handled spec in an annotation: a spec the API server admits but
    that annotation cannot hold would be retried forever (every string had no maxLength)."""
    largest = _json_bound(SPEC_SCHEMA)
    assert largest + ANNOTATION_OVERHEAD <= ANNOTATIONS_LIMIT, f"{largest} bytes"
    # The bound is an upper bound: a spec at the limits of the largest fields stays under it.
    big = copy.deepcopy(BASE["spec"])
    big["autoscaling"]["query"] = "\U0001f600" * 4096
    big["ray"]["nodeSelector"] = {f"k{i}.example.com/n{i}": "v" * 63 for i in range(32)}
    assert parse_spec(big) and len(json.dumps(big)) < largest


# -- the fuzz ----------------------------------------------------------------------------------

# (path, invalid value): each makes a spec invalid on its own, the way Kubernetes (or the model)
# would have it. Nulls and unknown fields are not here: the API server prunes them.
INVALID: list[tuple[str, Any]] = [
    ("metadata.name", "Grok-1"),
    ("metadata.name", "g" * 41),
    ("metadata.name", "1grok"),
    ("metadata.name", "grok_1"),
    ("spec.model.preset", "grok-2"),
    ("spec.model.preset", 1),
    ("spec.model.source", "pvc:///x"),
    ("spec.model.source", "pvc://Bad_Claim/x"),
    ("spec.model.source", "pvc://" + "c" * 58 + "/x"),
    ("spec.model.source", "ftp://host/x"),
    ("spec.model.source", "s3:///bucket"),
    ("spec.model.source", "s3://" + "b" * 3000),
    ("spec.model.tokenizer", "tokenizer.model"),
    ("spec.model.dtype", "float16"),
    ("spec.model.quantization", "int4"),
    ("spec.parallelism.device", "tpu"),
    ("spec.parallelism.gpusPerNode", 0),
    ("spec.parallelism.gpusPerNode", 65),
    ("spec.parallelism.gpusPerNode", "8"),
    ("spec.parallelism.gpusPerNode", 1.5),
    ("spec.parallelism.nodesPerReplica", -1),
    ("spec.parallelism.tensor", 3),
    ("spec.parallelism.tensor", 16),
    ("spec.parallelism.tensor", 2**63),
    ("spec.parallelism.expert", 5),
    ("spec.parallelism.expert", 0),
    ("spec.parallelism.placement", "random"),
    ("spec.replicas", -1),
    ("spec.replicas", 1025),
    ("spec.replicas", "one"),
    ("spec.autoscaling.minReplicas", 5),
    ("spec.autoscaling.maxReplicas", 0),
    ("spec.autoscaling.prometheusUrl", None),
    ("spec.autoscaling.prometheusUrl", "prometheus:9090"),
    ("spec.autoscaling.prometheusUrl", "http://" + "p" * 2100),
    ("spec.autoscaling.query", ""),
    ("spec.autoscaling.query", "q" * 5000),
    ("spec.autoscaling.targetQueuePerReplica", 1e-320),
    ("spec.autoscaling.targetQueuePerReplica", 0),
    ("spec.autoscaling.targetQueuePerReplica", -8),
    ("spec.autoscaling.targetQueuePerReplica", 1e308),
    ("spec.autoscaling.tolerance", 2),
    ("spec.autoscaling.scaleUpStabilizationSeconds", -1),
    ("spec.autoscaling.scaleDownStabilizationSeconds", 10**12),
    ("spec.autoscaling.scaleUpLimit", 0),
    ("spec.autoscaling.evaluationIntervalSeconds", 1),
    ("spec.autoscaling.evaluationIntervalSeconds", 10**9),
    ("spec.autoscaling.scaleToZeroIdleSeconds", 10),
    ("spec.autoscaling.enabled", "yes"),
    ("spec.serving.maxBatchSize", 0),
    ("spec.serving.maxBatchSize", 4097),
    ("spec.serving.maxSequenceLength", 100_000),
    ("spec.serving.maxSequenceLength", 1),
    ("spec.serving.maxQueuedRequests", -1),
    ("spec.ray.image", ""),
    ("spec.ray.image", "Registry.io/Image:tag"),
    ("spec.ray.image", "image:tag with space"),
    ("spec.ray.image", "ghcr.io/x/y@sha256:abc"),
    ("spec.ray.image", "i" * 600),
    ("spec.ray.rayVersion", "latest"),
    ("spec.ray.rayVersion", "2.60.0" + "x" * 40),
    ("spec.ray.headResources.cpu", "lots"),
    ("spec.ray.headResources.cpu", "1e3"),
    ("spec.ray.headResources.memory", "16GB"),
    ("spec.ray.headResources.memory", "-16Gi"),
    ("spec.ray.workerResources.cpu", "9" * 20),
    ("spec.ray.workerResources.memory", ""),
    ("spec.ray.gpuResourceName", "cpu"),
    ("spec.ray.gpuResourceName", "memory"),
    ("spec.ray.gpuResourceName", "kubernetes.io/gpu"),
    ("spec.ray.gpuResourceName", "nvidia.com/gpu/x"),
    ("spec.ray.nodeSelector", {"bad key!": "v"}),
    ("spec.ray.nodeSelector", {"k": "bad value!"}),
    ("spec.ray.nodeSelector", {"k": "v" * 64}),
    ("spec.ray.nodeSelector", {"a/b/c": "v"}),
    ("spec.ray.nodeSelector", {"x" * 64: "v"}),
    ("spec.ray.nodeSelector", {f"k{i}": "v" for i in range(33)}),
    ("spec.ray.nodeSelector", {"k": 1}),
    ("spec.ray.tolerations", [{"operator": "Equal", "value": "x"}]),
    ("spec.ray.tolerations", [{"key": "k", "operator": "Exists", "value": "x"}]),
    ("spec.ray.tolerations", [{"key": "bad key", "operator": "Exists"}]),
    ("spec.ray.tolerations", [{"key": "k", "value": "bad value!"}]),
    ("spec.ray.tolerations", [{"key": "k", "operator": "In"}]),
    ("spec.ray.tolerations", [{"key": "k", "effect": "NoRun"}]),
    ("spec.ray.tolerations", [{"key": "k", "effect": "NoSchedule", "tolerationSeconds": 5}]),
    ("spec.ray.tolerations", [{"key": "k", "effect": "NoExecute", "tolerationSeconds": -5}]),
    ("spec.ray.tolerations", [{"key": f"k{i}", "operator": "Exists"} for i in range(33)]),
    ("spec.ray.tolerations", "all"),
    ("spec.ray.serviceAccountName", "S3_Reader"),
    ("spec.ray.serviceAccountName", ""),
    ("spec.ray.serviceAccountName", "s" * 254),
    ("spec.ray.upgradeStrategy", "NewClusterWithIncrementalUpgrade"),
    ("spec.model", "grok-1"),
    ("spec.parallelism", []),
]
# Mutations that only make sense with the autoscaler on (they read its fields).
AUTOSCALED = {"spec.autoscaling.enabled": True, "spec.autoscaling.maxReplicas": 4}
AUTOSCALED_PROMETHEUS = "http://prometheus.monitoring:9090"
FUZZ_SPECS = 360
SEED = 20261129


def _set(body: dict[str, Any], path: str, value: Any) -> None:
    *parents, leaf = path.split(".")
    node = body
    for key in parents:
        if not isinstance(node.get(key), dict):
            node[key] = {}
        node = node[key]
    node[leaf] = value


def mutated_specs() -> list[tuple[list[tuple[str, Any]], dict[str, Any]]]:
    """Every invalid value alone, then seeded combinations of two or three, up to FUZZ_SPECS."""
    rng = random.Random(SEED)
    plans = [[entry] for entry in INVALID]
    while len(plans) < FUZZ_SPECS:
        plans.append(rng.sample(INVALID, rng.choice((2, 3))))
    specs = []
    for plan in plans:
        body = copy.deepcopy(BASE)
        if any(path.startswith("spec.autoscaling.") for path, _ in plan):
            for path, value in AUTOSCALED.items():
                _set(body, path, value)
            _set(body, "spec.autoscaling.prometheusUrl", AUTOSCALED_PROMETHEUS)
        for path, value in plan:
            _set(body, path, copy.deepcopy(value))
        specs.append((plan, body))
    return specs


def admission(body: dict[str, Any]) -> list[str]:
    """What the API server says: defaults, then the schema, then CEL (only on a schema-valid
    object, as it does)."""
    defaulted = apply_defaults(SCHEMA, body)
    errors = schema_errors(grokdeployment_validator(), defaulted)
    if errors:
        return errors
    try:
        return rule_failures(SCHEMA, defaulted)
    except Exception as error:  # a rule erroring out is a refusal too
        return [f"CEL error: {error}"]


def operator_outcome(body: dict[str, Any]) -> str:
    """What the operator does with it: 'refused' (Ready=False with a reason) or 'accepted'. Any
    other exception escapes, as it would into kopf's retry loop."""
    name = body["metadata"].get("name")
    try:
        check_name(name)
        spec = parse_spec(body.get("spec"))
        plan = replica_plan(name, spec)
    except SpecError as error:
        assert error.reason and error.message
        return "refused"
    build_children(Owner(name, "llm", "uid"), spec, plan, with_servicemonitor=True)
    if spec.autoscaling.enabled:
        policy = ScalingPolicy(policy_config(spec.autoscaling))
        for waiting in (0.0, 5.0, 1e308):
            policy.decide(0.0, spec.replicas, spec.replicas, QueueSample(waiting, 1.0))
    return "accepted"


def test_fuzzed_invalid_specs_are_all_refused_and_nothing_crashes() -> None:
    outcomes: Counter[str] = Counter()
    silent, crashed = [], []
    for plan, body in mutated_specs():
        refused_at_admission = bool(admission(body))
        try:
            by_operator = operator_outcome(body)
        except Exception as error:  # an error loop in kopf
            crashed.append((plan, repr(error)))
            continue
        if refused_at_admission:
            outcomes["refused at admission"] += 1
        elif by_operator == "refused":
            outcomes["Ready=False"] += 1
        else:
            silent.append(plan)
        outcomes[f"operator {by_operator}"] += 1
    total = len(mutated_specs())
    print(f"\nfuzz: {total} invalid specs (seed {SEED}): {dict(outcomes)}")
    assert total >= 300
    assert silent == [], f"{len(silent)} accepted silently, e.g. {silent[:5]}"
    assert crashed == [], f"{len(crashed)} crashed the operator, e.g. {crashed[:5]}"


def test_the_base_of_the_fuzz_is_valid() -> None:
    """Otherwise every mutation would be 'refused' for the base's own fault."""
    assert admission(BASE) == []
    assert operator_outcome(BASE) == "accepted"
