#!/usr/bin/env bash
# Type-check the grokserve package (mypy, configured in pyproject.toml) as it is imported.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
tree=$(mktemp -d)
trap 'rm -rf "$tree"' EXIT
bash "$repo/scripts/package_tree.sh" "$tree"
cd "$tree"
python3 -m mypy --config-file "$repo/pyproject.toml" -p grokserve
