#!/usr/bin/env bash
# Runs the whole Tollgate performance report on this machine: builds the release binaries,
# generates 10k- and 1M-account snapshots, starts the sidecar and the bare-hyper floor on
# loopback, runs every scenario, cross-checks with oha, and writes loadtest/out/.
#
# Knobs (environment): DURATION (measured seconds per run, default 10), WARMUP (default 3),
# PORT (sidecar, default 18181, below the ephemeral range; the floor uses PORT+1), SKIP_1M=1 (only the 10k part),
# SKIP_OHA=1, SWAPS (seconds of the swap run, default 20), CONNECTIONS (default 32).
# Every wait and every run is bounded by `timeout`.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
repo="$(dirname "$here")"
out="$here/out"
DURATION="${DURATION:-10}"
WARMUP="${WARMUP:-3}"
PORT="${PORT:-18181}"
FLOOR_PORT=$((PORT + 1))
SWAPS="${SWAPS:-20}"
CONNECTIONS="${CONNECTIONS:-32}"
mkdir -p "$out"
data="$out/data"
mkdir -p "$data"
tollgate="$repo/target/release/tollgate"
load="$repo/target/release/tollgate-load"
run_limit=$((DURATION + WARMUP + 60))

log() { printf '\n### %s\n' "$*" | tee -a "$out/summary.md" >&2; }
note() { printf '%s\n' "$*" | tee -a "$out/summary.md"; }

pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT

: > "$out/summary.md"
log "machine"
note "- cpus: $(nproc), model: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
note "- kernel: $(uname -r), memory: $(free -g | awk '/Mem:/ {print $2}') GiB"
note "- load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"

log "build"
(cd "$repo" && timeout 1800 cargo build --release --bin tollgate && timeout 1800 cargo build --release -p tollgate-loadtest) >&2

log "snapshots"
[ -f "$data/keys/tollgate.key" ] || "$tollgate" keygen --out "$data/keys" >&2
make_snapshot() { # accounts name
  # A snapshot from an older binary may not match its format: rebuild it then.
  if [ ! -f "$data/$2.snap" ] || [ "$tollgate" -nt "$data/$2.snap" ]; then
    rm -rf "$data/$2-policies"
    timeout 600 "$tollgate" gen --accounts "$1" --out "$data/$2-policies" >&2
    SECONDS=0
    timeout 1800 "$tollgate" compile "$data/$2-policies" \
      --key "$data/keys/tollgate.key" --out "$data/$2.snap" --revision 1 >&2
    note "- compiled $2 in ${SECONDS} s"
  fi
  note "- $2: $(stat -c %s "$data/$2.snap") bytes"
}
make_snapshot 10000 s10k
[ "${SKIP_1M:-0}" = 1 ] || make_snapshot 1000000 s1m

wait_ready() { # port pid
  for _ in $(seq 1 600); do
    kill -0 "$2" 2>/dev/null || { echo "server on port $1 exited" >&2; return 1; }
    curl -sf "http://127.0.0.1:$1/readyz" >/dev/null 2>&1 && return 0
    sleep 0.2
  done
  echo "server on port $1 not ready after 120 s" >&2
  return 1
}

sidecar_pid=""
start_sidecar() { # snapshot-file
  "$tollgate" sidecar --listen "127.0.0.1:$PORT" --trust-key "$data/keys/tollgate.pub" --snapshot "$1" \
    > "$out/sidecar-$(basename "$1").log" 2>&1 &
  sidecar_pid=$!
  pids+=("$sidecar_pid")
  wait_ready "$PORT" "$sidecar_pid"
}
stop_sidecar() {
  kill "$sidecar_pid" 2>/dev/null || true
  timeout 30 tail --pid="$sidecar_pid" -f /dev/null || kill -9 "$sidecar_pid" 2>/dev/null || true
}
rss() { # pid -> "VmRSS VmHWM" in MiB
  awk '/VmRSS|VmHWM/ {printf "%s %.1f MiB  ", $1, $2/1024}' "/proc/$1/status"
}

# One measured run; extra arguments go to `tollgate-load run`.
run() { # name target-port pid args...
  local name="$1" port="$2" pid="$3"
  shift 3
  timeout "$run_limit" "$load" run --target "127.0.0.1:$port" --pid "$pid" --duration "$DURATION" --warmup "$WARMUP" \
    --connections "$CONNECTIONS" --label "$name" --json "$out/$name.json" --svg "$out/$name.svg" --quiet "$@" \
    > "$out/$name.txt"
}

"$load" floor --listen "127.0.0.1:$FLOOR_PORT" --workers 2 > "$out/floor.log" 2>&1 &
floor_pid=$!
pids+=("$floor_pid")
wait_ready "$FLOOR_PORT" "$floor_pid"

log "10k accounts: latency at fixed rates, tollgate vs bare-hyper floor"
start_sidecar "$data/s10k.snap"
note "- sidecar idle RSS at 10k accounts: $(rss "$sidecar_pid")"
for rate in 1000 5000 10000; do
  run "floor-$rate" "$FLOOR_PORT" "$floor_pid" --scenario check --rate "$rate" --no-status
  run "check-$rate" "$PORT" "$sidecar_pid" --scenario check --rate "$rate" --accounts 10000
  note "- $("$load" ratio --floor "$out/floor-$rate.json" "$out/check-$rate.json")"
done
"$load" chart --out "$out/check-vs-floor.svg" --title "check at 1k/5k/10k req/s vs bare hyper (10k accounts)" \
  "$out"/floor-{1000,5000,10000}.json "$out"/check-{1000,5000,10000}.json

log "10k accounts: mix and batch"
run "mix-2000" "$PORT" "$sidecar_pid" --scenario mix --rate 2000 --accounts 10000
CONNECTIONS=2 run "batch-closed" "$PORT" "$sidecar_pid" --scenario batch --rate 0 --batch-size 1000 --accounts 10000
run "batch-500" "$PORT" "$sidecar_pid" --scenario batch --rate 500 --batch-size 1000 --accounts 10000
note "- batch decisions/s (closed loop, 2 connections x 1000 checks): $(grep -o '"decisions_per_sec": [0-9.]*' "$out/batch-closed.json" | awk '{printf "%.0f", $2}')"

log "10k accounts: /v1/meter with the durable usage log (an fdatasync per group of events)"
stop_sidecar
rm -rf "$data/meter-data"
"$tollgate" sidecar --listen "127.0.0.1:$PORT" --trust-key "$data/keys/tollgate.pub" --snapshot "$data/s10k.snap" \
  --data-dir "$data/meter-data" > "$out/sidecar-meter.log" 2>&1 &
sidecar_pid=$!
pids+=("$sidecar_pid")
wait_ready "$PORT" "$sidecar_pid"
for rate in 1000 5000; do
  run "meter-$rate" "$PORT" "$sidecar_pid" --scenario meter --rate "$rate" --accounts 10000
done
note "- usage log after the meter runs: $(du -sh "$data/meter-data/usage" | cut -f1)"
stop_sidecar
rm -rf "$data/meter-data"
start_sidecar "$data/s10k.snap"

log "10k accounts: highest rate with p99 < 1 ms and no errors"
# Step up until a rate fails, then bisect three times. At most 12 probes.
passes() { # rate -> 0 if p99 < 1 ms and no errors
  local name="search-$1"
  DURATION=5 WARMUP=2 run "$name" "$PORT" "$sidecar_pid" --scenario check --rate "$1" --accounts 10000 || return 1
  local p99 errors
  p99=$(sed -n '/"latency_us"/,/}/p' "$out/$name.json" | awk -F': ' '/"p99"/ {gsub(",", "", $2); print $2}')
  errors=$(awk -F': ' '/"errors"|"unsent"|"non_2xx"/ {gsub(",", "", $2); s += $2} END {print s+0}' "$out/$name.json")
  note "  - probe $1/s: p99 ${p99} us, errors+unsent+non-2xx ${errors}"
  awk -v p="$p99" -v e="$errors" 'BEGIN {exit !(p < 1000 && e == 0)}'
}
good=0; bad=0; rate=2500; probes=0
while [ "$probes" -lt 8 ] && [ "$rate" -le 40000 ]; do
  probes=$((probes + 1))
  if passes "$rate"; then good=$rate; rate=$((rate + 2500)); else bad=$rate; break; fi
done
if [ "$bad" -gt 0 ]; then
  for _ in 1 2 3; do
    [ $((bad - good)) -le 500 ] && break
    mid=$(((good + bad) / 2))
    if passes "$mid"; then good=$mid; else bad=$mid; fi
  done
fi
note "- highest rate with p99 < 1 ms and no errors: ${good}/s (first failing probe: ${bad}/s; 0 = none failed)"
stop_sidecar

if [ "${SKIP_1M:-0}" != 1 ]; then
  log "1M accounts: RSS, p99 with and without a swap every second"
  # Re-signed copies with increasing revisions, prepared before the runs so the swap cost
  # during the run is the sidecar's alone (read, verify, validate, swap, drop the old one).
  live="$data/live-1m.snap"
  cp "$data/s1m.snap" "$live"
  rm -rf "$data/swaps"
  timeout 900 "$load" restamp "$data/s1m.snap" --key "$data/keys/tollgate.key" --out-dir "$data/swaps" \
    --from 2 --count $((SWAPS + 4)) 2>/dev/null
  # Gigabytes were just written; let them reach the disk before measuring anything.
  sync
  start_sidecar "$live"
  note "- sidecar idle RSS at 1M accounts: $(rss "$sidecar_pid")"
  DURATION="$SWAPS" run "swap-off-1m-5000" "$PORT" "$sidecar_pid" --scenario check --rate 5000 --accounts 1000000
  DURATION="$SWAPS" run "swap-on-1m-5000" "$PORT" "$sidecar_pid" --scenario check --rate 5000 --accounts 1000000 \
    --swap-every 1 --swap-dir "$data/swaps" --swap-target "$live"
  note "- after swaps: $(rss "$sidecar_pid"); $(grep -A30 '"revisions_seen"' "$out/swap-on-1m-5000.json" | tr -d ' \n' | cut -c1-200)"
  note "- $("$load" ratio --floor "$out/swap-off-1m-5000.json" "$out/swap-on-1m-5000.json")"
  "$load" chart --out "$out/swaps-1m.svg" --title "check at 5k req/s, 1M accounts, with and without a swap every second" \
    "$out/swap-off-1m-5000.json" "$out/swap-on-1m-5000.json"
  stop_sidecar
  rm -rf "$data/swaps" "$live"
fi

if [ "${SKIP_OHA:-0}" != 1 ]; then
  log "cross-check with oha at 5000/s"
  command -v oha >/dev/null || timeout 1200 cargo install oha --locked >&2
  start_sidecar "$data/s10k.snap"
  body='{"account":"acct-42","feature":"feature-3","user":"user-0","region":"eu"}'
  for target in "floor:$FLOOR_PORT" "check:$PORT"; do
    name="${target%%:*}"; port="${target##*:}"
    timeout "$run_limit" oha --no-tui -q 5000 --latency-correction -z "${DURATION}s" -c "$CONNECTIONS" \
      -m POST -H 'content-type: application/json' -d "$body" "http://127.0.0.1:$port/v1/check" \
      > "$out/oha-$name-5000.txt"
    run "ours-$name-5000" "$port" "$([ "$name" = floor ] && echo "$floor_pid" || echo "$sidecar_pid")" \
      --scenario check --rate 5000 --accounts 10000 --no-status
    note "- oha $name at 5000/s: $(grep -E '^\s+(50.00|90.00|99.00|99.90)%' "$out/oha-$name-5000.txt" | tr -s ' ' | tr '\n' ';')"
  done
  stop_sidecar
fi

log "all runs"
"$load" table "$out"/*.json | tee -a "$out/summary.md"
note "- load average at end: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "results in $out (summary.md, *.json, *.svg)" >&2
