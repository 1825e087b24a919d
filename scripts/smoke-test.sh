#!/usr/bin/env bash
# Smoke test of a built binary from the outside, the way an operator would: start it on a free loopback
# port with a fresh SQLite database, then use `buf curl` to list services through reflection, check
# health, create an order and read it back. Then again as the README's Security section runs it:
# mutual TLS with scripts/dev-certs.sh's certificates and JWT with a token from the dev-token example
# (built beside the binary by `cargo build --release --examples`).
# Usage: scripts/smoke-test.sh path/to/binary
set -euo pipefail

binary=$(realpath "${1:?usage: $0 path/to/binary}")
repo=$(cd "$(dirname "$0")/.." && pwd)
buf="$repo/node_modules/.bin/buf"
work=$(mktemp -d)
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
url="http://127.0.0.1:$port"
token_tool="$(dirname "$binary")/examples/dev-token"
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

(cd "$work" && APP_SERVER__GRPC_ADDR="127.0.0.1:$port" APP_SERVER__METRICS_ADDR=127.0.0.1:0 APP_HEALTH__CHECK_INTERVAL=200ms \
  exec "$binary" serve >"$work/server.log" 2>&1) &
server_pid=$!

# Waits, at most 60 tries 0.5 s apart, until `$1 $2/grpc.health.v1.Health/Check` reports SERVING; on
# failure prints the server's log, $3.
wait_until_serving() {
  local caller=$1 base=$2 log=$3
  for _ in $(seq 60); do
    if "$caller" "$base/grpc.health.v1.Health/Check" 2>/dev/null | grep -q '"SERVING"'; then
      return 0
    fi
    sleep 0.5
  done
  echo "smoke: the server at $base never reported SERVING" >&2
  cat "$log" >&2
  exit 1
}
wait_until_serving call "$url" "$work/server.log"

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

# --- Mutual TLS and JWT -------------------------------------------------------------------------
certs="$work/certs"
"$repo/scripts/dev-certs.sh" "$certs" >/dev/null
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
surl="https://127.0.0.1:$port"
(cd "$work" && APP_SERVER__GRPC_ADDR="127.0.0.1:$port" APP_SERVER__METRICS_ADDR=127.0.0.1:0 APP_HEALTH__CHECK_INTERVAL=200ms \
  APP_DATABASE__URL="sqlite://secure.db" \
  APP_TLS__CERT_FILE="$certs/server.crt" APP_TLS__KEY_FILE="$certs/server.key" \
  APP_TLS__CLIENT_CA_FILE="$certs/ca.crt" \
  APP_AUTH__MODE=jwt APP_AUTH__JWT_SECRET_FILE="$certs/jwt-secret" \
  APP_AUTH__ISSUER=smoke APP_AUTH__AUDIENCE=smoke \
  exec "$binary" serve >"$work/secure.log" 2>&1) &
server_pid=$!

# The client certificate, and the CA that signed the server's; --cert/--key are the mTLS half.
scall() { "$buf" curl --protocol grpc --cacert "$certs/ca.crt" --cert "$certs/client.crt" --key "$certs/client.key" "$@"; }

wait_until_serving scall "$surl" "$work/secure.log"

token=$("$token_tool" --secret-file "$certs/jwt-secret" --issuer smoke --audience smoke \
  --scope "orders.read orders.write" --subject smoke-test)
created=$(scall -H "authorization: Bearer $token" \
  -d '{"order": {"items": ["widget"], "price_cents": 1250, "destination": "Oslo"}}' "$surl/$api/CreateOrder")
id=$(python3 -c 'import json, sys; print(json.load(sys.stdin)["order"]["id"])' <<<"$created")
scall -H "authorization: Bearer $token" -d "{\"id\": \"$id\"}" "$surl/$api/GetOrder" | grep -q "$id"

# Refusals: no token, a read-only token writing, no client certificate, plaintext.
expect_failure() {
  local what=$1 pattern=$2
  shift 2
  local output
  if output=$("$@" 2>&1); then
    echo "smoke: $what succeeded: $output" >&2
    exit 1
  fi
  grep -qi -- "$pattern" <<<"$output" || { echo "smoke: $what: expected $pattern, got: $output" >&2; exit 1; }
}
expect_failure "a call without a token" unauthenticated scall -d "{\"id\": \"$id\"}" "$surl/$api/GetOrder"
reader=$("$token_tool" --secret-file "$certs/jwt-secret" --issuer smoke --audience smoke --scope orders.read)
expect_failure "a write with a read-only token" permission_denied scall -H "authorization: Bearer $reader" \
  -d '{"order": {"items": ["widget"], "price_cents": 1, "destination": "Oslo"}}' "$surl/$api/CreateOrder"
expect_failure "a client without a certificate" "" "$buf" curl --protocol grpc --cacert "$certs/ca.crt" \
  "$surl/grpc.health.v1.Health/Check"
expect_failure "a plaintext client" "" call "http://127.0.0.1:$port/grpc.health.v1.Health/Check"
grep -q '"TLS handshake failed"' "$work/secure.log" || {
  echo "smoke: refused handshakes were not logged" >&2
  exit 1
}

kill -TERM "$server_pid"
wait "$server_pid"
server_pid=""
echo "smoke: OK ($api over mutual TLS with JWT: health, CreateOrder, GetOrder, refusals, SIGTERM exit 0)"
