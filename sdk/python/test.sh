#!/usr/bin/env bash
# Runs the tollgate_sdk tests against real sidecars: `sdk/python/test.sh path/to/tollgate`.
# Builds nothing with cargo; installs pytest when it is missing.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
binary="$(realpath "${1:?usage: test.sh path/to/tollgate}")"
cd "$here"
python3 -c "import pytest" 2>/dev/null || python3 -m pip install -q pytest
TOLLGATE_BIN="$binary" PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}" \
  python3 ../cases/serve_cases.py --bin "$binary" -- python3 -m pytest -q -p no:cacheprovider tests
