#!/usr/bin/env bash
# The SDK checks, for CI: `sdk/ci.sh target/debug/tollgate`. Builds nothing with cargo (it is
# given the built binary); installs what the checks need when it is missing (libfaketime for
# the frozen-clock case sidecars, pytest and the OpenFeature Python packages, the npm
# devDependencies and the OpenFeature JS packages from their committed lock files), then runs
# the OFREP interop, the TypeScript SDK tests and the Python SDK tests. Exits non-zero when any
# of them fails; each runner prints its own summary, and a last line sums up the suites.
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
binary="$(realpath "${1:?usage: sdk/ci.sh path/to/tollgate}")"
[ -x "$binary" ] || { echo "sdk/ci.sh: \`$binary\` is not an executable" >&2; exit 2; }

if ! command -v faketime >/dev/null 2>&1; then
  echo "== installing libfaketime (apt)"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq faketime) >/dev/null 2>&1 || true
fi
# Every shared decision case pins its `now`; without faketime they could not run live, and a
# CI run that silently skips them would prove nothing.
command -v faketime >/dev/null 2>&1 || { echo "sdk/ci.sh: faketime is required and could not be installed" >&2; exit 2; }

python3 -c "import pytest, openfeature.contrib.provider.ofrep" 2>/dev/null ||
  python3 -m pip install -q --disable-pip-version-check pytest -r "$here/interop/python/requirements.txt" ||
  { echo "sdk/ci.sh: pip install failed" >&2; exit 2; }
(cd "$here/typescript" && [ -d node_modules ] || npm ci --no-audit --no-fund) || { echo "sdk/ci.sh: npm ci failed (typescript)" >&2; exit 2; }
(cd "$here/interop/node" && [ -d node_modules ] || npm ci --no-audit --no-fund) || { echo "sdk/ci.sh: npm ci failed (interop)" >&2; exit 2; }

passed=0
failed=0
suite() {
  local name="$1"
  shift
  echo "== $name"
  if "$@"; then
    passed=$((passed + 1))
  else
    failed=$((failed + 1))
    echo "== $name FAILED"
  fi
}
suite "OFREP interop (official OpenFeature SDKs)" "$here/interop/run.sh" "$binary"
suite "TypeScript SDK (@tollgate/sdk)" "$here/typescript/test.sh" "$binary"
suite "Python SDK (tollgate_sdk)" "$here/python/test.sh" "$binary"
echo "sdk suites: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
