"""The operator image has neither torch nor ray: the operator must never import them."""

from __future__ import annotations

import os
import subprocess
import sys

MODULES = [
    "grokserve.operator.spec",
    "grokserve.operator.rules",
    "grokserve.operator.replica",
    "grokserve.operator.builders",
    "grokserve.operator.status",
    "grokserve.operator.crd",
    "grokserve.operator.render",
    "grokserve.operator.reconcile",
    "grokserve.operator.handlers",
    "grokserve.commands.render",
    "grokserve.commands.operator",
]


def test_operator_imports_neither_torch_nor_ray() -> None:
    code = (
        "import importlib, sys\n"
        f"for name in {MODULES!r}: importlib.import_module(name)\n"
        "heavy = sorted(m for m in ('torch', 'ray') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    env = {**os.environ, "PYTHONSAFEPATH": "1"}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env
    )
    assert result.returncode == 0, result.stderr
