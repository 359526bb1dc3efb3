# Rampart's image: the sidecar (`rampart run`), its init container
# (`rampart init`, which needs iptables) and the webhook (`rampart webhook`).
#
# Two ways to build (docs/kubernetes.md, "Building the image"):
#
#   From source, in a Rust builder image (the default target, `runtime`):
#     podman build -t rampart:dev .
#     podman build --build-arg BUILD_IMAGE=localhost/my-rust:1.85 -t rampart:dev .
#
#   From a binary built on the host (target `prebuilt`; no Rust toolchain in
#   any image, which is what the tests do, as no registry is reachable there).
#   The build context is a directory holding only the `rampart` binary:
#     cargo build --release --locked -p rampart
#     mkdir -p /tmp/ctx && cp target/release/rampart /tmp/ctx/
#     podman build --target prebuilt -f Dockerfile -t rampart:dev /tmp/ctx
#
# The binary links glibc dynamically: build it on (or for) the runtime
# image's Debian release.

ARG BUILD_IMAGE=docker.io/library/rust:1-bookworm
ARG RUNTIME_IMAGE=docker.io/library/debian:bookworm-slim

FROM ${BUILD_IMAGE} AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p rampart \
 && install -m 0755 target/release/rampart /rampart

# Everything but the binary. iptables is for `rampart init`; the sidecar
# itself needs nothing from the image but libc, and no shell at run time.
FROM ${RUNTIME_IMAGE} AS base
RUN if ! command -v iptables-restore >/dev/null; then \
      apt-get update \
      && apt-get install -y --no-install-recommends iptables \
      && rm -rf /var/lib/apt/lists/*; \
    fi
# The sidecar's UID: `rampart init --proxy-uid` (2102 by default) exempts
# its connections from capture. The init container overrides it with
# `runAsUser: 0` plus NET_ADMIN and NET_RAW.
USER 2102:2102
ENTRYPOINT ["/usr/local/bin/rampart"]
CMD ["--help"]

FROM base AS prebuilt
COPY --chmod=0755 rampart /usr/local/bin/rampart

FROM base AS runtime
COPY --from=build /rampart /usr/local/bin/rampart
