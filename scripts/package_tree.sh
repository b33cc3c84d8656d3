#!/usr/bin/env bash
# Lay out the `grokserve` package as Python imports it, in DIR, from symlinks into this checkout:
# pyproject's package-dir maps folders model/, serving/ and operator/ to grokserve.model, .serving
# and .operator, which tools that read source trees (mypy) or machines without our install
# (bench/gpu_check.sh) cannot follow otherwise.
#   bash scripts/package_tree.sh DIR     # then DIR/grokserve is importable with DIR on the path
set -euo pipefail
dest=${1:?usage: package_tree.sh DIR}
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
mkdir -p "$dest/grokserve"
for entry in "$repo"/grokserve/*.py "$repo"/grokserve/commands; do
  ln -sfn "$entry" "$dest/grokserve/"
done
for sub in model serving operator; do
  ln -sfn "$repo/$sub" "$dest/grokserve/$sub"
done
