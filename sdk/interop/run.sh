#!/usr/bin/env bash
# The official OpenFeature SDKs (Python and JavaScript, with their OFREP providers) against a
# real Tollgate sidecar: `sdk/interop/run.sh path/to/tollgate`. Builds nothing; starts one
# sidecar over policies/ on a free port, runs both, exits non-zero on any mismatch.
# Needs: pip packages openfeature-sdk and openfeature-provider-ofrep; npm ci in node/.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
binary="$(realpath "${1:?usage: run.sh path/to/tollgate}")"
port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
url="http://127.0.0.1:$port"
log="$(mktemp)"
RUST_LOG=error "$binary" sidecar --policies "$repo/policies" --listen "127.0.0.1:$port" >"$log" 2>&1 &
pid=$!
trap 'kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; rm -f "$log"' EXIT
for _ in $(seq 1 200); do
  curl -fsS "$url/readyz" >/dev/null 2>&1 && break
  kill -0 "$pid" 2>/dev/null || { cat "$log"; exit 1; }
  sleep 0.05
done
curl -fsS "$url/readyz" >/dev/null || { echo "sidecar not ready"; cat "$log"; exit 1; }
[ -d "$here/node/node_modules" ] || (cd "$here/node" && npm ci --no-audit --no-fund)
status=0
python3 "$here/python/interop.py" "$url" || status=1
node "$here/node/interop.mjs" "$url" || status=1
exit "$status"
