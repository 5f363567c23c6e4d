# Warren container image.
#
#   docker build -t warren .
#   docker run --rm -p 8080:8080 -p 9090:9090 \
#     -v "$PWD/deploy/warren/warren.toml:/etc/warren/warren.toml:ro" \
#     -v "$PWD/deploy/warren/dev-secrets:/run/secrets:ro" warren
#
# The image always starts `warren serve --config /etc/warren/warren.toml`: without a
# config Warren runs its dev mode, which listens on 127.0.0.1 only and is useless in a
# container. Mount a config there (ConfigMap, compose bind mount) or override CMD.

# ---- build ---------------------------------------------------------------------
# Matches `rust-version` in Cargo.toml (edition 2024 needs 1.85 or later).
FROM rust:1.88-bookworm AS builder
WORKDIR /build

# Dependency layer: build every dependency against placeholder sources so that this
# slow layer is reused until Cargo.toml or Cargo.lock change.
COPY Cargo.toml Cargo.lock ./
# Cargo.toml names the load generator's source (an example); it must exist to parse.
COPY bench/main.rs ./bench/main.rs
# Patched lapin and amq-protocol-types ([patch.crates-io]; vendor/*/PATCHED.md).
COPY vendor ./vendor
RUN mkdir src \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs \
    && cargo build --release --locked \
    && rm -rf src

# The real sources. COPY keeps the files' original mtimes, which can be older than
# the placeholder build above; touching them makes cargo rebuild the warren crate
# instead of shipping the placeholder binary. If the crate ever reads files outside
# src/ at compile time (build.rs, include_str!), copy them here too.
COPY src ./src
# assets/demo.html is compiled in (include_str! in src/api/mod.rs), and so is the
# JavaScript client the page imports (/clients/warren.js).
COPY assets ./assets
COPY clients/js/warren.js ./clients/js/warren.js
RUN find src -type f -exec touch {} + \
    && cargo build --release --locked \
    && install -m 0755 target/release/warren /warren

# ---- runtime -------------------------------------------------------------------
# Distroless: glibc, libgcc, CA certificates and tzdata; no shell, no package manager.
# TLS to the broker uses rustls with the system roots, so no OpenSSL is needed.
FROM gcr.io/distroless/cc-debian12:nonroot AS base

LABEL org.opencontainers.image.title="warren" \
      org.opencontainers.image.description="HTTP/WebSocket gateway for RabbitMQ" \
      org.opencontainers.image.licenses="Apache-2.0"

COPY --from=builder /warren /usr/local/bin/warren

# Numeric so that Kubernetes' runAsNonRoot can verify it (65532 = distroless `nonroot`).
USER 65532:65532

# 8080: HTTP API, WebSocket, /healthz, /readyz. 9090: /metrics (server.metrics_listen).
EXPOSE 8080 9090

ENTRYPOINT ["/usr/local/bin/warren"]
CMD ["serve", "--config", "/etc/warren/warren.toml"]

# ---- compose (local stack only) ------------------------------------------------
# docker-compose.yml builds this target: the release image plus a static busybox
# `wget`, because a compose healthcheck runs inside the container and distroless has
# no HTTP client. Kubernetes probes over HTTP and uses the release image below.
FROM busybox:1.36.1-musl AS busybox
FROM base AS compose
# busybox picks its applet from the name it is started by: here, wget. No shell is added
# to the PATH.
COPY --from=busybox /bin/busybox /usr/local/bin/wget

# ---- release (default target) --------------------------------------------------
FROM base AS release
