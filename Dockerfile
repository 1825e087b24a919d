# syntax=docker/dockerfile:1
# The service's image: a release build on Debian 12, run on distroless cc (glibc, CA certificates,
# no shell), as the numeric non-root user 65532. Build it with:
#   docker build --build-arg VERSION=0.1.0 --build-arg REVISION="$(git rev-parse HEAD)" -t order-service .
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
RUN cargo build --locked --release --features postgres --bin order-service \
    # The working directory the image runs in, created here because the runtime has no shell.
    && mkdir -p /out/app

# Debian 12 (bookworm), like the builder, so the binary's glibc matches. Pin the digest in your own
# registry (gcr.io/distroless/cc-debian12:nonroot@sha256:...) for reproducible rollouts.
FROM gcr.io/distroless/cc-debian12:nonroot
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="order-service" \
      org.opencontainers.image.description="A production-shaped gRPC service in Rust" \
      org.opencontainers.image.source="https://github.com/example/order-service" \
      org.opencontainers.image.licenses="MIT OR Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}"

COPY --from=builder /src/target/release/order-service /usr/local/bin/order-service
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
    CMD ["/usr/local/bin/order-service", "healthcheck", "--service", "", "--timeout", "2s"]
ENTRYPOINT ["/usr/local/bin/order-service"]
CMD ["serve"]
