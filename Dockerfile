# syntax=docker/dockerfile:1
# The service's image: a release build on Debian 12, run on distroless cc (glibc, CA certificates,
# no shell), as the numeric non-root user 65532. It names no service: the binary is the workspace's one
# binary, whatever the package is called, and it is /usr/local/bin/service in every image (the
# Kubernetes exec probes and deploy/check.py rely on that path). Build it from the repository's root:
#   name=$(basename "$(scripts/binary-path.sh)")
#   docker build --build-arg VERSION=0.1.0 --build-arg REVISION="$(git rev-parse HEAD)" \
#     --build-arg TITLE="$name" --build-arg SOURCE="$(git remote get-url origin)" -t "$name" .
# Dependencies compile in a layer of their own (cargo-chef), rebuilt only when Cargo.toml or Cargo.lock
# change, not on every source edit.

ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-slim-bookworm AS chef
RUN cargo install --locked cargo-chef@0.1.73
WORKDIR /src

FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

FROM chef AS builder
COPY --from=planner /src/recipe.json recipe.json
# The PostgreSQL store is always in the image (the prod overlay uses it), whatever the default features.
RUN cargo chef cook --locked --release --features postgres --recipe-path recipe.json
COPY . .
# --bins builds the workspace's binaries: the service's one (platform/ is a library). Its path comes
# from cargo itself, the `compiler-artifact` message of the `bin` target (--message-format=json, while
# diagnostics still reach the log as text), rather than from Cargo.toml's first `name =` or from
# `cargo metadata` parsed with sed: neither the package's name nor a [[bin]] rename, CARGO_TARGET_DIR
# or the profile's directory is guessed, and a second binary fails the build instead of shipping the
# wrong one. It is copied to /out/service, a name no service owns.
RUN set -eu; \
    cargo build --locked --release --features postgres --bins --message-format=json-render-diagnostics \
        >/tmp/build.json; \
    sed -n 's/.*"kind":\["bin"\].*"executable":"\([^"]*\)".*/\1/p' /tmp/build.json >/tmp/binaries; \
    if [ "$(wc -l </tmp/binaries)" -ne 1 ]; then \
        echo "expected exactly one binary, cargo built: $(cat /tmp/binaries)" >&2; exit 1; \
    fi; \
    # The working directory the image runs in, created here because the runtime has no shell.
    mkdir -p /out/app; \
    cp "$(cat /tmp/binaries)" /out/service

# Debian 12 (bookworm), like the builder, so the binary's glibc matches. Pin the digest in your own
# registry (gcr.io/distroless/cc-debian12:nonroot@sha256:...) for reproducible rollouts.
FROM gcr.io/distroless/cc-debian12:nonroot
ARG VERSION=0.1.0
ARG REVISION=unknown
# The service's name and its repository's URL, given at build time (see the top): empty otherwise.
ARG TITLE
ARG SOURCE
LABEL org.opencontainers.image.title="${TITLE}" \
      org.opencontainers.image.description="A production-shaped gRPC service in Rust" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.licenses="MIT OR Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}"

COPY --from=builder /out/service /usr/local/bin/service
# /app is the service user's, so `docker run` works on the default SQLite file (/app/orders.db); the
# configuration in it stays root's. Kubernetes runs with a read-only root: its manifests mount the
# configuration over /app/config and give SQLite (dev overlay) a volume of its own.
COPY --from=builder --chown=65532:65532 /out/app /app
COPY config/default.toml /app/config/default.toml
WORKDIR /app
USER 65532:65532

# gRPC, and Prometheus metrics at /metrics.
EXPOSE 50051 9090
# Liveness (service ""): a container that is alive but waiting for its database is not restarted.
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["/usr/local/bin/service", "healthcheck", "--service", "", "--timeout", "2s"]
ENTRYPOINT ["/usr/local/bin/service"]
CMD ["serve"]
