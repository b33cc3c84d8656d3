"""The distribution ships every package folder, and the import packages cannot shadow the stdlib."""

import os
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def declared() -> tuple[set[str], dict[str, str]]:
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    return set(setuptools["packages"]), setuptools["package-dir"]


def test_every_package_folder_is_declared_so_the_wheel_ships_it() -> None:
    packages, package_dir = declared()
    found = set()
    for name, folder in package_dir.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(ROOT / folder)
            found.add(".".join([name, *relative.parts]))
    assert found == packages, f"add to [tool.setuptools] packages: {sorted(found - packages)}"


def test_operator_package_does_not_shadow_the_standard_library() -> None:
    env = {**os.environ, "PYTHONSAFEPATH": "1"}
    code = "import operator, grokserve.operator as ours; print(operator.__file__, ours.__name__)"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    )
    stdlib_file, ours = out.stdout.split()
    assert not stdlib_file.startswith(str(ROOT)) and ours == "grokserve.operator"
