"""The operator's image has no torch: with torch (and ray) unimportable, `grokserve render` renders
every shipped example, refuses what does not fit or cannot serve, and `grokserve plan` plans."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "manifests" / "examples").glob("*.yaml"))

# Runs `grokserve` once per argv list in one interpreter where importing torch or ray fails, and
# prints [exit status, stdout, stderr] per run as JSON.
RUNNER = """
import contextlib, io, json, sys

class Unimportable:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("torch", "ray"):
            raise ImportError(f"{name} is not installed in the operator image")
        return None

sys.meta_path.insert(0, Unimportable())
from grokserve.cli import main

results = []
for argv in json.loads(sys.argv[1]):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(argv)
    results.append([status, out.getvalue(), err.getvalue()])
assert not {"torch", "ray"} & set(sys.modules), sorted(sys.modules)
print(json.dumps(results))
"""


def without_torch(*runs: list[str]) -> list[tuple[int, str, str]]:
    result = subprocess.run(
        [sys.executable, "-c", RUNNER, json.dumps(list(runs))],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONSAFEPATH": "1"},
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr
    return [tuple(run) for run in json.loads(result.stdout)]


def variant(tmp_path: Path, example: str, change) -> str:
    body = yaml.safe_load((REPO / "manifests" / "examples" / example).read_text())
    change(body["spec"])
    path = tmp_path / f"variant-{len(list(tmp_path.iterdir()))}.yaml"
    path.write_text(yaml.safe_dump(body))
    return str(path)


def squeeze_onto_one_node(spec: dict) -> None:
    spec["parallelism"].update(nodesPerReplica=1)
    for degree in ("tensor", "expert"):
        spec["parallelism"].pop(degree, None)


def test_render_and_plan_work_without_torch(tmp_path: Path) -> None:
    refusals = {
        "int8 on 40Gi GPUs": (
            variant(
                tmp_path,
                "grok-1-int8-single-node.yaml",
                lambda spec: spec["parallelism"].update(gpuMemory="40Gi"),
            ),
            "grok-1 in int8 does not fit on 1 node of 8×40 GiB",
        ),
        "bf16 squeezed onto one node": (
            variant(tmp_path, "grok-1-bf16-two-node.yaml", squeeze_onto_one_node),
            "grok-1 in bfloat16 does not fit on 1 node of 8×80 GiB",
        ),
        "grok-1 without a source": (
            variant(
                tmp_path, "grok-1-int8-single-node.yaml", lambda spec: spec["model"].pop("source")
            ),
            "model.source is required for grok-1",
        ),
    }
    runs = [["render", str(path)] for path in EXAMPLES]
    runs += [["render", path] for path, _ in refusals.values()]
    runs += [["plan"], ["plan", "--gpu-memory", "80"]]
    results = without_torch(*runs)
    for path, (status, out, err) in zip(EXAMPLES, results, strict=False):
        assert status == 0, f"{path.name}: {err}"
        assert "kind: RayService" in out
    for (what, (_, message)), (status, out, err) in zip(
        refusals.items(), results[len(EXAMPLES) :], strict=False
    ):
        assert status == 1 and out == "", what
        assert message in err, (what, err)
    (plan_status, plan_out, _), (unit_status, _, unit_err) = results[-2:]
    assert plan_status == 0 and plan_out.startswith("grok-1 on 2 nodes of 8×80 GiB")
    assert unit_status == 1 and "'80' needs a number and a unit: Ki, Mi, Gi" in unit_err


@pytest.mark.parametrize("module", ["config", "presets", "placement"])
def test_the_models_planning_modules_need_no_torch(module: str) -> None:
    code = RUNNER.split("from grokserve.cli")[0] + f"import grokserve.model.{module}\n"
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONSAFEPATH": "1"},
    )
    assert result.returncode == 0, result.stderr
