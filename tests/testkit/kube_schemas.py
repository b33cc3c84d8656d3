"""Schemas to validate rendered manifests against: our CRD and KubeRay's real CRDs.

KubeRay's CRDs are test data outside the repository (`<repo>/../shared/kuberay/`); tests that need
them skip with a message where that folder is absent.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
KUBERAY_DIR = REPO.parent / "shared" / "kuberay"
CRD_FILE = REPO / "manifests" / "crd" / "grokdeployments.yaml"


def _served_schema(crd: dict[str, Any], version: str) -> dict[str, Any]:
    for entry in crd["spec"]["versions"]:
        if entry["name"] == version:
            return entry["schema"]["openAPIV3Schema"]
    raise LookupError(f"{crd['metadata']['name']} serves no version {version}")


@cache
def kuberay_validator(plural: str) -> jsonschema.Draft4Validator:
    """Validator for `ray.io/v1` objects of KubeRay's CRD `ray.io_<plural>.yaml`."""
    path = KUBERAY_DIR / f"ray.io_{plural}.yaml"
    if not path.is_file():
        pytest.skip(f"KubeRay CRD not found at {path} (test data outside the repository)")
    return jsonschema.Draft4Validator(_served_schema(yaml.safe_load(path.read_text()), "v1"))


@cache
def grokdeployment_validator() -> jsonschema.Draft4Validator:
    # OpenAPI v3.0 schemas use draft-4 style exclusiveMinimum booleans.
    return jsonschema.Draft4Validator(
        _served_schema(yaml.safe_load(CRD_FILE.read_text()), "v1alpha1")
    )


def schema_errors(validator: jsonschema.Draft4Validator, body: dict[str, Any]) -> list[str]:
    return sorted(
        f"{'.'.join(str(p) for p in error.absolute_path)}: {error.message}"
        for error in validator.iter_errors(body)
    )
