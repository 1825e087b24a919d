#!/usr/bin/env bash
# Checks a built binary's observability from the outside, the way Prometheus sees it:
#   1. promtool checks the alerting rules in deploy/observability/ and runs their unit tests;
#   2. the binary starts on free loopback ports (gRPC and metrics) with a fresh SQLite database, and
#      `buf curl` makes a few calls: health, CreateOrder, ListOrders, SearchOrders (a server stream)
#      and a GetOrder that fails with INVALID_ARGUMENT;
#   3. /metrics answers in the Prometheus text format (Content-Type text/plain; version=0.0.4), passes
#      `promtool check metrics` and holds the series the dashboard and the alerts use;
#   4. a real Prometheus scrapes it every second with the alerting rules loaded: it must find
#      grpc_server_handled_total, see the target up, and evaluate every rule without error.
# Installs nothing: it needs promtool and prometheus on the PATH (Debian/Ubuntu: apt-get install
# prometheus), python3, and buf from `npm install`. On failure it prints the service's and
# Prometheus's logs.
# Usage: scripts/observability-check.sh path/to/binary
set -euo pipefail

binary=$(realpath "${1:?usage: $0 path/to/binary}")
repo=$(cd "$(dirname "$0")/.." && pwd)
obs="$repo/deploy/observability"
buf="$repo/node_modules/.bin/buf"
# The job the rules in alerts.yaml select: the package's name, which is the binary's.
job=$(basename "$binary")
# <package>_build_info: the binary is named after the package, whose '-' become '_' in the prefix.
build_info="$(basename "$binary" | tr - _)_build_info"

say() { echo "observability: $*"; }
die() {
  echo "observability: FAILED: $*" >&2
  exit 1
}

for tool in promtool prometheus; do
  command -v "$tool" >/dev/null ||
    die "$tool is not on the PATH: install Prometheus first (Debian/Ubuntu: apt-get install prometheus)"
done
command -v python3 >/dev/null || die "python3 is not on the PATH"
[ -x "$buf" ] || die "$buf is missing: run npm install first"
[ -x "$binary" ] || die "$binary is not an executable"

work=$(mktemp -d)
server_pid=""
prom_pid=""

# Stops what this script started; after a failure, prints the logs first.
cleanup() {
  local status=$?
  if [ "$status" -ne 0 ]; then
    for log in server prometheus; do
      if [ -s "$work/$log.log" ]; then
        echo "observability: --- $log log (last 200 lines) ---" >&2
        tail -n 200 "$work/$log.log" >&2
      fi
    done
  fi
  for pid in "$prom_pid" "$server_pid"; do
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
      kill -TERM "$pid" 2>/dev/null || true
      wait "$pid" 2>/dev/null || true
    fi
  done
  rm -rf "$work"
  exit "$status"
}
trap cleanup EXIT

# --- 1. The rules ---------------------------------------------------------------------------------
promtool check rules "$obs/alerts.yaml" >"$work/promtool.log" 2>&1 || {
  cat "$work/promtool.log" >&2
  die "promtool check rules $obs/alerts.yaml"
}
say "promtool check rules: OK ($(grep -c '^ *- alert:' "$obs/alerts.yaml") alerts)"
promtool test rules "$obs/alerts.test.yaml" >"$work/promtool.log" 2>&1 || {
  cat "$work/promtool.log" >&2
  die "promtool test rules $obs/alerts.test.yaml"
}
say "promtool test rules: OK"

# --- 2. The service and a few calls ---------------------------------------------------------------
# Three distinct free loopback ports, held together so that none is handed out twice.
read -r grpc_port metrics_port prom_port < <(python3 -c '
import socket
socks = [socket.socket() for _ in range(3)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))
')
url="http://127.0.0.1:$grpc_port"
metrics_url="http://127.0.0.1:$metrics_port/metrics"
prom_url="http://127.0.0.1:$prom_port"

(cd "$work" && APP_SERVER__GRPC_ADDR="127.0.0.1:$grpc_port" \
  APP_SERVER__METRICS_ADDR="127.0.0.1:$metrics_port" APP_HEALTH__CHECK_INTERVAL=200ms \
  exec "$binary" serve >"$work/server.log" 2>&1) &
server_pid=$!

call() { "$buf" curl --http2-prior-knowledge --protocol grpc "$@"; }

serving=""
for _ in $(seq 60); do
  kill -0 "$server_pid" 2>/dev/null || die "the service exited during start-up"
  if call "$url/grpc.health.v1.Health/Check" 2>/dev/null | grep -q '"SERVING"'; then
    serving=yes
    break
  fi
  sleep 0.5
done
[ -n "$serving" ] || die "the service at $url never reported SERVING"
say "service SERVING at $url, metrics at $metrics_url"

services=$(call --list-services "$url") || die "buf curl --list-services $url failed"
# The API is the service that is not part of gRPC itself (its package changes with `cargo generate`).
api=$(grep -v '^grpc\.' <<<"$services" || true)
if [ -z "$api" ] || [ "$(wc -l <<<"$api")" -ne 1 ]; then
  die "expected one API service beside gRPC's: $services"
fi

call -d "{\"service\": \"$api\"}" "$url/grpc.health.v1.Health/Check" | grep -q '"SERVING"' ||
  die "$api is not SERVING"
call -d '{"order": {"items": ["widget"], "price_cents": 1250, "destination": "Oslo"}}' \
  "$url/$api/CreateOrder" >/dev/null || die "CreateOrder failed"
call -d '{}' "$url/$api/ListOrders" >/dev/null || die "ListOrders failed"
call -d '{"query": "widget"}' "$url/$api/SearchOrders" >/dev/null || die "SearchOrders failed"
# buf curl exits non-zero on an error status: this call is meant to fail.
if output=$(call -d '{"id": "not-a-uuid"}' "$url/$api/GetOrder" 2>&1); then
  die "GetOrder with a malformed id succeeded: $output"
fi
grep -qi invalid_argument <<<"$output" || die "GetOrder with a malformed id: expected invalid_argument, got: $output"
say "calls made: $api health, CreateOrder, ListOrders, SearchOrders, GetOrder (INVALID_ARGUMENT)"

# --- 3. /metrics -------------------------------------------------------------------------------------
# fetch URL BODY HEADERS: the body and the response headers ("Name: value" lines) of a GET into files.
fetch() {
  if command -v curl >/dev/null; then
    curl -sS --fail --max-time 10 -D "$3" -o "$2" "$1"
  else
    python3 - "$@" <<'PY'
import sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=10) as response:
    body = response.read()
    headers = "".join(f"{name}: {value}\r\n" for name, value in response.getheaders())
open(sys.argv[2], "wb").write(body)
open(sys.argv[3], "w").write(headers)
PY
  fi
}

scraped=""
for _ in $(seq 20); do
  if fetch "$metrics_url" "$work/metrics.txt" "$work/metrics.headers" 2>"$work/fetch.log"; then
    scraped=yes
    break
  fi
  sleep 0.5
done
[ -n "$scraped" ] || die "GET $metrics_url failed: $(cat "$work/fetch.log")"
content_type=$(grep -i '^content-type:' "$work/metrics.headers" | tail -n 1 | cut -d: -f2- | sed 's/^ *//; s/\r$//' || true)
[[ "$content_type" == "text/plain; version=0.0.4"* ]] ||
  die "$metrics_url answered Content-Type '$content_type', not text/plain; version=0.0.4"
promtool check metrics <"$work/metrics.txt" >"$work/lint.log" 2>&1 || {
  cat "$work/lint.log" >&2
  die "promtool check metrics found problems in $metrics_url"
}

# has_series [--nonzero] NAME LABEL=VALUE...: whether the scrape holds a sample of NAME with those
# labels (with --nonzero: one whose value is not 0; the service creates some series at 0 up front).
has_series() {
  python3 - "$work/metrics.txt" "$@" <<'PY'
import re, sys
path, *args = sys.argv[1:]
nonzero = args[0] == "--nonzero"
name, *pairs = args[1:] if nonzero else args
want = dict(pair.split("=", 1) for pair in pairs)
for line in open(path):
    m = re.match(r'([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)', line)
    if not m or m.group(1) != name:
        continue
    labels = dict(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
    if all(labels.get(k) == v for k, v in want.items()) and not (nonzero and float(m.group(3)) == 0):
        sys.exit(0)
sys.exit(1)
PY
}
# Every metric the dashboard and the alerts read.
for name in grpc_server_started_total grpc_server_handled_total grpc_server_msg_received_total \
  grpc_server_msg_sent_total grpc_server_handling_seconds_bucket grpc_server_handling_seconds_sum \
  grpc_server_handling_seconds_count grpc_server_in_flight_rpcs db_client_connections_usage \
  db_client_connections_max db_client_connections_wait_time_seconds_bucket \
  db_client_operation_duration_seconds_bucket "$build_info" process_cpu_seconds_total \
  process_open_fds process_max_fds process_resident_memory_bytes process_virtual_memory_bytes \
  process_start_time_seconds process_threads otel_spans_dropped_total; do
  has_series "$name" || die "$metrics_url has no $name"
done
has_series --nonzero grpc_server_handled_total grpc_type=unary "grpc_service=$api" grpc_method=GetOrder \
  grpc_code=InvalidArgument || die "no grpc_server_handled_total for the failed GetOrder (grpc_code=InvalidArgument)"
has_series --nonzero grpc_server_handled_total grpc_type=server_stream "grpc_service=$api" \
  grpc_method=SearchOrders grpc_code=OK || die "no grpc_server_handled_total for SearchOrders (server_stream, OK)"
has_series grpc_server_handling_seconds_bucket grpc_type=unary le=0.25 ||
  die "no le=\"0.25\" bucket of grpc_server_handling_seconds (the latency SLO alerts read it)"
say "GET /metrics: $content_type, promtool check metrics clean, $(grep -c '^[a-z]' "$work/metrics.txt") samples"

# --- 4. A real Prometheus -------------------------------------------------------------------------------
cat >"$work/prometheus.yaml" <<EOF
global:
  scrape_interval: 1s
  evaluation_interval: 1s
rule_files:
  - $obs/alerts.yaml
scrape_configs:
  - job_name: $job
    static_configs:
      - targets: ["127.0.0.1:$metrics_port"]
EOF
promtool check config "$work/prometheus.yaml" >"$work/promtool.log" 2>&1 || {
  cat "$work/promtool.log" >&2
  die "promtool check config of the generated Prometheus configuration"
}
prometheus --config.file="$work/prometheus.yaml" --storage.tsdb.path="$work/data" \
  --web.listen-address="127.0.0.1:$prom_port" >"$work/prometheus.log" 2>&1 &
prom_pid=$!

# query PROMQL: the /api/v1/query answer into $work/answer.json.
query() {
  local encoded
  encoded=$(python3 -c 'import sys, urllib.parse; print(urllib.parse.quote(sys.argv[1], safe=""))' "$1")
  fetch "$prom_url/api/v1/query?query=$encoded" "$work/answer.json" "$work/answer.headers" 2>/dev/null
}
# answer_has_result: whether the last answer is a success with at least one series.
answer_has_result() {
  python3 - "$work/answer.json" <<'PY'
import json, sys
answer = json.load(open(sys.argv[1]))
sys.exit(0 if answer.get("status") == "success" and answer["data"]["result"] else 1)
PY
}

found=""
for _ in $(seq 60); do
  kill -0 "$prom_pid" 2>/dev/null || die "Prometheus exited"
  if query grpc_server_handled_total && answer_has_result; then
    found=yes
    break
  fi
  sleep 0.5
done
[ -n "$found" ] || die "Prometheus at $prom_url never returned grpc_server_handled_total"
say "Prometheus scraped grpc_server_handled_total"

query "up{job=\"$job\"}" || die "Prometheus query up{job=\"$job\"} failed"
python3 - "$work/answer.json" <<'PY' || die "up{job=\"$job\"} is not 1: $(cat "$work/answer.json")"
import json, sys
result = json.load(open(sys.argv[1]))["data"]["result"]
sys.exit(0 if result and all(series["value"][1] == "1" for series in result) else 1)
PY
say "up{job=\"$job\"} == 1"

# Every alerting rule loaded and evaluated (health "ok"; "unknown" until its first evaluation).
alerts=$(grep -c '^ *- alert:' "$obs/alerts.yaml")
evaluated=""
for _ in $(seq 60); do
  if fetch "$prom_url/api/v1/rules" "$work/rules.json" "$work/rules.headers" 2>/dev/null; then
    verdict=0
    python3 - "$work/rules.json" "$alerts" <<'PY' || verdict=$?
import json, sys
groups = json.load(open(sys.argv[1]))["data"]["groups"]
rules = [rule for group in groups for rule in group["rules"]]
failing = [rule for rule in rules if rule.get("health") == "err"]
for rule in failing:
    print(f'observability: rule {rule["name"]}: {rule.get("lastError")}', file=sys.stderr)
sys.exit(2 if failing else 0 if len(rules) == int(sys.argv[2]) and all(r.get("health") == "ok" for r in rules) else 1)
PY
    [ "$verdict" -ne 2 ] || die "Prometheus fails to evaluate alerting rules"
    if [ "$verdict" -eq 0 ]; then
      evaluated=yes
      break
    fi
  fi
  sleep 0.5
done
[ -n "$evaluated" ] || die "Prometheus did not evaluate all $alerts alerting rules: $(cat "$work/rules.json" 2>/dev/null)"
say "Prometheus loaded and evaluated all $alerts alerting rules"

kill -TERM "$prom_pid"
wait "$prom_pid" || true
prom_pid=""
kill -TERM "$server_pid"
wait "$server_pid" || die "the service did not exit cleanly on SIGTERM"
server_pid=""
say "OK ($api: rules, metrics format and lint, Prometheus scrape, SIGTERM exit 0)"
