#!/usr/bin/env bash
# Smoke test of a built binary from the outside, the way an operator would: start it on a free loopback
# port with a fresh SQLite database, then use `buf curl` to list services through reflection, check
# health, create an order and read it back. Usage: scripts/smoke-test.sh path/to/binary
set -euo pipefail

binary=$(realpath "${1:?usage: $0 path/to/binary}")
repo=$(cd "$(dirname "$0")/.." && pwd)
buf="$repo/node_modules/.bin/buf"
work=$(mktemp -d)
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
url="http://127.0.0.1:$port"
server_pid=""

cleanup() {
  if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then
    kill -TERM "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT

call() { "$buf" curl --http2-prior-knowledge --protocol grpc "$@"; }

(cd "$work" && APP_SERVER__GRPC_ADDR="127.0.0.1:$port" APP_SERVER__HEALTH_CHECK_INTERVAL=200ms \
  exec "$binary" serve >"$work/server.log" 2>&1) &
server_pid=$!

# Bounded wait for readiness: at most 60 tries, 0.5 s apart.
for _ in $(seq 60); do
  if call "$url/grpc.health.v1.Health/Check" 2>/dev/null | grep -q '"SERVING"'; then
    break
  fi
  sleep 0.5
done
call "$url/grpc.health.v1.Health/Check" | grep -q '"SERVING"' || {
  echo "smoke: server never reported SERVING" >&2
  cat "$work/server.log" >&2
  exit 1
}

services=$(call --list-services "$url")
for service in grpc.health.v1.Health grpc.reflection.v1.ServerReflection; do
  grep -qx "$service" <<<"$services" || { echo "smoke: $service not listed: $services" >&2; exit 1; }
done
# The API is the service that is not part of gRPC itself (its package changes with `cargo generate`).
api=$(grep -v '^grpc\.' <<<"$services")
[ "$(wc -l <<<"$api")" -eq 1 ] && [[ "$api" == *.OrderService ]] || {
  echo "smoke: expected one OrderService beside the gRPC services: $services" >&2
  exit 1
}

created=$(call -d '{"order": {"items": ["widget"], "price_cents": 1250, "destination": "Oslo"}}' \
  "$url/$api/CreateOrder")
id=$(python3 -c 'import json, sys; print(json.load(sys.stdin)["order"]["id"])' <<<"$created")
fetched=$(call -d "{\"id\": \"$id\"}" "$url/$api/GetOrder")
python3 - "$id" "$fetched" <<'PY'
import json, sys
order = json.loads(sys.argv[2])["order"]
assert order["id"] == sys.argv[1], order
assert order["status"] == "ORDER_STATUS_PENDING", order
assert order["items"] == ["widget"], order
PY
call -d "{\"service\": \"$api\"}" "$url/grpc.health.v1.Health/Check" | grep -q '"SERVING"'

kill -TERM "$server_pid"
wait "$server_pid"
server_pid=""
echo "smoke: OK ($api: reflection, health, CreateOrder, GetOrder, SIGTERM exit 0)"
