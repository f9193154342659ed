#!/usr/bin/env bash
# Runs the @tollgate/sdk tests against real sidecars: `sdk/typescript/test.sh path/to/tollgate`.
# Builds nothing with cargo; compiles the TypeScript with the tsc devDependency (npm test).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
binary="$(realpath "${1:?usage: test.sh path/to/tollgate}")"
cd "$here"
[ -d node_modules ] || npm ci --no-audit --no-fund
TOLLGATE_BIN="$binary" python3 ../cases/serve_cases.py --bin "$binary" -- npm test --silent
