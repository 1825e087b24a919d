#!/usr/bin/env bash
# Benchmark, not a test (CI never runs it): GetOrder throughput and CPU per call with everything
# observable on (JSON log line per call, Prometheus metrics, traces sampled at 10 % and exported to a
# live OTLP receiver, the otlp-sink example) against everything off (no log lines, metrics_addr = "",
# no exporter), two servers side by side, measured in alternating rounds so that a noisy host hurts
# both alike.
# Needs: h2load (Debian nghttp2-client), `npm install` (buf), and
#   cargo build --release --bins --examples
# Usage: scripts/bench-observability.sh [rounds]   (REQUESTS=100000 CONNECTIONS=16 STREAMS=8)
# MODES="off logs metrics traces on" also measures each part on its own (default: "off on");
# SAMPLE_RATIO (default 0.1) sets the traced modes' telemetry.sample_ratio.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
binary=$("$repo/scripts/binary-path.sh" release)
sink="$(dirname "$binary")/examples/otlp-sink"
buf="$repo/node_modules/.bin/buf"
rounds=${1:-3}
requests=${REQUESTS:-100000}
connections=${CONNECTIONS:-16}
streams=${STREAMS:-8}
work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

command -v h2load >/dev/null || { echo "bench: h2load missing (apt-get install nghttp2-client)" >&2; exit 1; }
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
call() { "$buf" curl --http2-prior-knowledge --protocol grpc "$@"; }

sink_port=$(free_port)
"$sink" "127.0.0.1:$sink_port" >"$work/sink.out" 2>&1 &
pids+=($!)

# start NAME ENV... : a server in a directory (and SQLite database) of its own.
start() {
  local name=$1 port
  shift
  port=$(free_port)
  mkdir -p "$work/$name"
  (cd "$work/$name" && exec env APP_SERVER__GRPC_ADDR="127.0.0.1:$port" "$@" "$binary" serve \
    >"$work/$name/log" 2>&1) &
  pids+=($!)
  eval "${name}_pid=$!; ${name}_port=$port"
  for _ in $(seq 60); do
    call "http://127.0.0.1:$port/grpc.health.v1.Health/Check" 2>/dev/null | grep -q SERVING && return
    sleep 0.5
  done
  echo "bench: $name never became ready" >&2
  cat "$work/$name/log" >&2
  exit 1
}

modes=${MODES:-off on}
metrics_port=$(free_port)
logs=(APP_TELEMETRY__LOG_LEVEL=info APP_TELEMETRY__LOG_FORMAT=json)
no_logs=(APP_TELEMETRY__LOG_LEVEL=off)
metrics=(APP_SERVER__METRICS_ADDR="127.0.0.1:$metrics_port")
no_metrics=(APP_SERVER__METRICS_ADDR=)
traces=(APP_TELEMETRY__OTLP_ENDPOINT="http://127.0.0.1:$sink_port" APP_TELEMETRY__SAMPLE_RATIO="${SAMPLE_RATIO:-0.1}")
for mode in $modes; do
  case $mode in
    off) start off "${no_logs[@]}" "${no_metrics[@]}" ;;
    logs) start logs "${logs[@]}" "${no_metrics[@]}" ;;
    metrics) start metrics "${no_logs[@]}" APP_SERVER__METRICS_ADDR="127.0.0.1:$(free_port)" ;;
    traces) start traces "${no_logs[@]}" "${no_metrics[@]}" "${traces[@]}" ;;
    on) start on "${logs[@]}" "${metrics[@]}" "${traces[@]}" ;;
    *) echo "bench: unknown mode $mode" >&2; exit 1 ;;
  esac
done

# The API service is the one that is not part of gRPC; one order in each database to read back.
first=${modes%% *}
port_var="${first}_port"
api=$(call --list-services "http://127.0.0.1:${!port_var}" | grep -v '^grpc\.')
frame() {
  local port=$1 id
  id=$(call -d '{"order": {"items": ["widget"], "price_cents": 1250, "destination": "Oslo"}}' \
    "http://127.0.0.1:$port/$api/CreateOrder" | python3 -c 'import json, sys; print(json.load(sys.stdin)["order"]["id"])')
  # A gRPC frame: no compression, 4-byte length, then GetOrderRequest { id = 1 }.
  python3 - "$id" "$work/frame-$port" <<'PY'
import struct, sys
body = b"\x0a" + bytes([len(sys.argv[1])]) + sys.argv[1].encode()
open(sys.argv[2], "wb").write(b"\x00" + struct.pack(">I", len(body)) + body)
PY
}
for mode in $modes; do
  port_var="${mode}_port"
  frame "${!port_var}"
done

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
ticks_per_second=$(getconf CLK_TCK)

printf '%-6s %-4s %12s %14s\n' round mode "calls/s" "CPU us/call"
for round in $(seq "$rounds"); do
  for mode in $modes; do
    port_var="${mode}_port" pid_var="${mode}_pid"
    port=${!port_var} pid=${!pid_var}
    before=$(cpu_ticks "$pid")
    out=$(h2load -n "$requests" -c "$connections" -m "$streams" -t 1 -d "$work/frame-$port" \
      -H 'content-type: application/grpc' -H 'te: trailers' "http://127.0.0.1:$port/$api/GetOrder")
    after=$(cpu_ticks "$pid")
    rate=$(grep -oP 'finished in [0-9.]+\w+, \K[0-9.]+' <<<"$out")
    succeeded=$(grep -oP '\d+(?= succeeded)' <<<"$out")
    [ "$succeeded" -eq "$requests" ] || { echo "bench: $mode: only $succeeded of $requests succeeded" >&2; exit 1; }
    cpu_us=$(python3 -c "print(round(($after - $before) / $ticks_per_second / $requests * 1e6, 1))")
    printf '%-6s %-4s %12s %14s\n' "$round" "$mode" "$rate" "$cpu_us"
  done
done

# h2load counts a gRPC error as a success (the status is in the trailers): the server's own count
# says whether the calls were answered OK.
if [[ " $modes " == *" on "* ]]; then
  ok=$(curl -s "http://127.0.0.1:$metrics_port/metrics" |
    grep -F "grpc_code=\"OK\",grpc_method=\"GetOrder\"" | awk '{print $2}')
  echo "on: GetOrder answered OK $ok times (expected $((rounds * requests)))"
  kill -TERM "$on_pid"
  wait "$on_pid" || true
  echo "on: $(grep -c '"rpc finished"' "$work/on/log") log lines"
fi
kill -TERM "${pids[0]}"
wait "${pids[0]}" || true
cat "$work/sink.out"
