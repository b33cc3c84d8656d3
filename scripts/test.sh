#!/usr/bin/env bash
# Set up everything the test suite needs on a fresh Debian machine, then run it.
# Used by `.ci/run` and quoted in the README; exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."

# The folder `operator/` sits at the repository root; keep the root off sys.path so it can never
# shadow the standard library's `operator` module.
export PYTHONSAFEPATH=1

if ! command -v prometheus >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get install -y -q prometheus >/dev/null 2>&1 \
    || { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q prometheus >/dev/null; }
fi

python3 -m pip install -q torch==2.13.0
python3 -m pip install -q -e '.[all,dev,kernels]'

ruff check .
ruff format --check .
bash scripts/typecheck.sh
python3 -m pytest "$@"
