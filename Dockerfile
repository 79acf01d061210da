# The exactly image: `exactlyd` (the entrypoint) with its `exactly-exec-guard` (which runs each
# `exec` job's command; exactlyd finds it next to itself), the `exactly` CLI and `exactly-sink`.
#
# Anywhere with a registry:   docker build -t exactly .
# On a machine without one:   scripts/docker-image.sh   (makes the base image locally with
#                             debootstrap and copies in binaries built on the host; see there)
#
# The file works with the legacy builder and with BuildKit alike (no RUN --mount), because the
# machine this project is developed on has only the legacy builder.

# The Rust toolchain image that compiles the binaries, and the image they run on. The local
# build passes its own debootstrapped base for both (the builder stage then compiles nothing).
ARG RUST_IMAGE=rust:1.95-slim-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim

FROM ${RUST_IMAGE} AS builder
# Empty: compile from the source in the build context. Set to a directory of the build context
# that holds ready `exactlyd`, `exactly-exec-guard`, `exactly` and `exactly-sink` binaries (glibc
# 2.36 or older, i.e. built on Debian bookworm) to use those instead; scripts/docker-image.sh
# does this.
ARG PREBUILT=
LABEL exactly.stage=builder
WORKDIR /src
COPY . .
RUN set -eu; \
    mkdir -p /out; \
    if [ -n "$PREBUILT" ]; then \
        cp "$PREBUILT/exactlyd" "$PREBUILT/exactly-exec-guard" "$PREBUILT/exactly" \
            "$PREBUILT/exactly-sink" /out/; \
    else \
        CARGO_PROFILE_RELEASE_DEBUG=0 CARGO_PROFILE_RELEASE_STRIP=debuginfo \
            cargo build --release --locked --bin exactlyd --bin exactly-exec-guard --bin exactly \
            --bin exactly-sink; \
        cp target/release/exactlyd target/release/exactly-exec-guard target/release/exactly \
            target/release/exactly-sink /out/; \
    fi; \
    cp scripts/docker-entrypoint.sh /out/exactly-entrypoint; \
    cp scripts/docker-healthcheck.sh /out/exactly-healthcheck; \
    cp scripts/docker-certs.sh /out/exactly-certs; \
    chmod 0755 /out/*

FROM ${RUNTIME_IMAGE} AS runtime
# tini forwards signals and reaps what nobody else does (each `exec` job's guard reaps its own
# command's orphans; tini gets those of a guard that was itself killed). The local base has it
# already, so the local build needs no package mirror here.
RUN set -eu; \
    if ! command -v tini >/dev/null; then \
        apt-get update; \
        apt-get install -y --no-install-recommends tini; \
        rm -rf /var/lib/apt/lists/*; \
    fi; \
    groupadd --system --gid 10001 exactly; \
    useradd --system --uid 10001 --gid exactly --home-dir /var/lib/exactly --no-create-home \
        --shell /usr/sbin/nologin exactly; \
    install -d -o exactly -g exactly -m 0750 /var/lib/exactly
COPY --from=builder /out/ /usr/local/bin/

# Configuration by environment (flags and a TOML file named by EXACTLY_CONFIG override or add
# to it). EXACTLY_ADVERTISE, the address other nodes dial, defaults to <hostname>:<gRPC port>
# (see scripts/docker-entrypoint.sh); set it when the host name does not resolve for peers.
ENV EXACTLY_LISTEN=0.0.0.0:7101 \
    EXACTLY_HTTP_LISTEN=0.0.0.0:8101 \
    EXACTLY_DATA_DIR=/var/lib/exactly \
    EXACTLY_ENDPOINTS=http://127.0.0.1:7101 \
    NO_COLOR=1
VOLUME ["/var/lib/exactly"]
# 7101: gRPC public API (and node-to-node traffic without a peer port). 7201: the peer port
# the deployment files use (EXACTLY_PEER_LISTEN, mutual TLS). 8101: HTTP /healthz, /readyz,
# /metrics, dashboard. A node listening beyond loopback needs TLS and tokens (README,
# "Security"), or EXACTLY_INSECURE=1; `exactly-certs` makes what a deployment needs.
EXPOSE 7101 7201 8101
USER exactly:exactly
WORKDIR /var/lib/exactly
# Ready = a leader is known, this node holds a valid lease and has applied the log: the node's
# gRPC health check on its API port (`exactly health`), over https when the API has TLS.
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["/usr/local/bin/exactly-healthcheck"]
# SIGTERM is what `docker stop` sends; exactlyd shuts down on it. Allow it the drain deadline
# (docker stop -t, compose stop_grace_period, Kubernetes terminationGracePeriodSeconds).
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/exactly-entrypoint"]
CMD []
