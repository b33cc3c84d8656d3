"""`grokserve render FILE`: the children as YAML for every example; clear errors otherwise."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "manifests" / "examples").glob("*.yaml"))


def grokserve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "grokserve.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONSAFEPATH": "1"},
        cwd=REPO,
    )


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_render_prints_every_child(path: Path) -> None:
    result = grokserve("render", str(path))
    assert result.returncode == 0, result.stderr
    documents = list(yaml.safe_load_all(result.stdout))
    assert [d["kind"] for d in documents] == [
        "ConfigMap",
        "RayService",
        "Service",
        "PodDisruptionBudget",
        "Service",
        "ServiceMonitor",
    ]
    serve_config = yaml.safe_load(documents[1]["spec"]["serveConfigV2"])
    assert serve_config["applications"][0]["import_path"] == "grokserve.serving.app:build_app"


def test_render_names_the_problem(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "apiVersion: grokserve.io/v1alpha1\nkind: GrokDeployment\nmetadata: {name: g}\n"
        "spec: {model: {preset: grok-tiny}, parallelism: {tensor: 8, nodesPerReplica: 2}}\n"
    )
    result = grokserve("render", str(bad))
    assert result.returncode == 1
    assert "parallelism.tensor must divide the model's kv heads" in result.stderr
    assert "(here model.preset=grok-tiny, parallelism.tensor=8, the model's kv heads=4)" in (
        result.stderr
    )
    missing = grokserve("render", str(tmp_path / "missing.yaml"))
    assert missing.returncode == 2 and "cannot read" in missing.stderr
