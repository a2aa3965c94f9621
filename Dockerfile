# syntax=docker/dockerfile:1
# One image for both of Berth's binaries: the manifests run `berth-agent run …` (deploy/agent/daemonset.yaml) and
# `berth-controller …` (deploy/controller/deployment.yaml) from it.
#
#   docker build -t ghcr.io/berth-dev/berth:dev .
#
# The build stage runs hack/build-release, the same script CI runs on its own.

ARG RUST_VERSION=1.95

FROM docker.io/library/rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
COPY . .
# The registry and target caches make rebuilds incremental; the binaries are copied out of the cache mount by
# hack/build-release within the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    hack/build-release /out

# glibc and libgcc of Debian 12, like the build stage; no shell, no package manager. Runs as uid 65532 by default
# (the controller); the agent's DaemonSet sets uid 0 itself. LVM pools will need lvm2's tools in the agent's
# image: that becomes a Debian-slim based stage when the lvm backend lands.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/berth-agent /out/berth-controller /usr/local/bin/
USER 65532:65532
LABEL org.opencontainers.image.title="Berth" \
      org.opencontainers.image.description="Node-local volume provisioner for Kubernetes: berth-agent and berth-controller" \
      org.opencontainers.image.licenses="Apache-2.0"
CMD ["berth-controller", "--help"]
