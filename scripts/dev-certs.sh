#!/usr/bin/env bash
# Makes DEVELOPMENT credentials for running the server with TLS, mutual TLS and JWT authentication:
#   ca.crt, ca.key           a throwaway certificate authority that signs the two certificates below
#   server.crt, server.key   the server: CN localhost, SANs DNS:localhost, IP:127.0.0.1, IP:::1; serverAuth
#   client.crt, client.key   a client: CN dev-client, SAN URI spiffe://dev.local/client; clientAuth
#   jwt-secret               an HS256 secret (32 random bytes, hex) for auth.jwt_secret_file
# Keys are EC P-256 in PKCS#8 PEM; certificates are valid for 30 days. Everything here is for a
# developer's machine: commit none of it (certs/ is in .gitignore) and use none of it in production.
#
# Usage: scripts/dev-certs.sh [--force] [DIR]    (DIR defaults to certs/; --force replaces its files)
# Needs only the openssl command line (OpenSSL 3).
set -euo pipefail

usage() { echo "usage: $0 [--force] [DIR]" >&2; exit 2; }

force=false
dir=""
for arg in "$@"; do
  case $arg in
    --force) force=true ;;
    -h | --help) echo "usage: $0 [--force] [DIR]"; exit 0 ;;
    -*) echo "dev-certs: unknown option $arg" >&2; usage ;;
    *) [ -z "$dir" ] || usage; dir=$arg ;;
  esac
done
dir=${dir:-certs}
dir=${dir%/}

command -v openssl >/dev/null || { echo "dev-certs: the openssl command is needed" >&2; exit 1; }

if [ -d "$dir" ] && [ -n "$(ls -A "$dir")" ] && ! $force; then
  echo "dev-certs: $dir/ is not empty; pass --force to replace its files" >&2
  exit 1
fi

umask 077 # keys and secret readable by their owner only
mkdir -p "$dir"
# Made beside the results, then moved over them one by one, so a running server that re-reads them
# never sees a half-written file.
work=$(mktemp -d "$dir/.dev-certs.XXXXXX")
trap 'rm -rf "$work"' EXIT

# A minimal request configuration, so that nothing from the system's openssl.cnf adds extensions.
cat >"$work/req.cnf" <<'EOF'
[req]
distinguished_name = dn
prompt = no
[dn]
EOF

key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$work/$1.key" 2>/dev/null; }
serial() { echo "0x$(openssl rand -hex 16)"; }

# The CA: self-signed, allowed to sign certificates and nothing else.
key ca
openssl req -x509 -new -config "$work/req.cnf" -key "$work/ca.key" -subj "/CN=Development CA" \
  -days 30 -set_serial "$(serial)" -sha256 \
  -addext "basicConstraints=critical,CA:TRUE,pathlen:0" \
  -addext "keyUsage=critical,keyCertSign,cRLSign" \
  -addext "subjectKeyIdentifier=hash" \
  -out "$work/ca.crt"

# leaf NAME CN EXTENSIONS: a key and a certificate signed by the CA.
leaf() {
  local name=$1 cn=$2 extensions=$3
  key "$name"
  openssl req -new -config "$work/req.cnf" -key "$work/$name.key" -subj "/CN=$cn" -out "$work/$name.csr"
  printf '%s\n' "basicConstraints=critical,CA:FALSE" "keyUsage=critical,digitalSignature" \
    "subjectKeyIdentifier=hash" "authorityKeyIdentifier=keyid,issuer" "$extensions" >"$work/$name.ext"
  openssl x509 -req -in "$work/$name.csr" -CA "$work/ca.crt" -CAkey "$work/ca.key" \
    -set_serial "$(serial)" -days 30 -sha256 -extfile "$work/$name.ext" -out "$work/$name.crt" 2>/dev/null
}

leaf server localhost "$(printf '%s\n' "extendedKeyUsage=serverAuth" \
  "subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1")"
leaf client dev-client "$(printf '%s\n' "extendedKeyUsage=clientAuth" \
  "subjectAltName=URI:spiffe://dev.local/client")"

openssl rand -hex 32 >"$work/jwt-secret"

openssl verify -CAfile "$work/ca.crt" "$work/server.crt" "$work/client.crt" >/dev/null

for file in ca.crt ca.key server.crt server.key client.crt client.key jwt-secret; do
  mv -f "$work/$file" "$dir/$file"
done

# The JWT audience the README uses: this package's name.
manifest="$(dirname "$0")/../Cargo.toml"
audience=$(sed -n 's/^name = "\(.*\)"$/\1/p' "$manifest" 2>/dev/null | head -n 1)
audience=${audience:-my-service}

cat <<EOF
Development credentials in $dir/ (valid 30 days; never commit them or use them in production).

TLS:
  APP_TLS__CERT_FILE=$dir/server.crt APP_TLS__KEY_FILE=$dir/server.key
Mutual TLS, in addition (clients then need --cert $dir/client.crt --key $dir/client.key):
  APP_TLS__CLIENT_CA_FILE=$dir/ca.crt
JWT (mint a token with: cargo run --example dev-token -- --secret-file $dir/jwt-secret --issuer dev --audience $audience --scope "orders.read orders.write" --subject alice):
  APP_AUTH__MODE=jwt APP_AUTH__JWT_SECRET_FILE=$dir/jwt-secret APP_AUTH__ISSUER=dev APP_AUTH__AUDIENCE=$audience
Clients trust the server with --cacert $dir/ca.crt.
EOF
