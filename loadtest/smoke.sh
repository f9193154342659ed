#!/usr/bin/env bash
# CI smoke test: builds the sidecar and the load generator, starts a dev-mode sidecar on a
# 1000-account synthetic policy set, and runs a 2-second mix at 500 req/s that fails on any
# error, timeout or non-2xx answer. Loopback only; every wait is bounded.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
port="${PORT:-18191}"
(cd "$repo" && cargo build --release -p tollgate --bin tollgate && cargo build --release -p tollgate-loadtest)
work="$(mktemp -d)"
"$repo/target/release/tollgate" gen --accounts 1000 --out "$work/policies" >/dev/null
"$repo/target/release/tollgate" sidecar --listen "127.0.0.1:$port" --policies "$work/policies" > "$work/sidecar.log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null || true; rm -rf "$work"' EXIT
for _ in $(seq 1 150); do
  curl -sf "http://127.0.0.1:$port/readyz" >/dev/null 2>&1 && break
  kill -0 "$pid" 2>/dev/null || { cat "$work/sidecar.log"; exit 1; }
  sleep 0.2
done
timeout 60 "$repo/target/release/tollgate-load" run --smoke --target "127.0.0.1:$port" --accounts 1000 --pid "$pid"
