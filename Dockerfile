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
# The commit the binaries and the labels name (deploy/README.md, "Versions and upgrades"):
#   docker build --build-arg BERTH_COMMIT=$(git rev-parse HEAD) .
ARG BERTH_COMMIT
ENV BERTH_COMMIT=${BERTH_COMMIT}
COPY . .
# The registry and target caches make rebuilds incremental; the binaries are copied out of the cache mount by
# hack/build-release within the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    hack/build-release /out

# Debian 12 slim: the same Debian, and so the same glibc, as the build stage's rust:…-bookworm. The agent runs
# lvm2's lvm, mkfs.xfs/mkfs.ext4, xfs_growfs/resize2fs, mount/umount and blkdiscard for LVM pools; image/packages
# lists the packages that bring them (installed without Recommends, nothing else), image/lvmlocal.conf sets lvm2
# up for a container without udev. Distroless has none of these tools and no package manager to add them.
# hack/build-image builds the same image without Docker (docs/images.md). Runs as uid 65532 by default (the
# controller); the agent's DaemonSet sets uid 0 itself.
FROM docker.io/library/debian:bookworm-slim
RUN --mount=type=bind,source=image/packages,target=/tmp/packages \
    packages=$(sed -e 's/#.*//' /tmp/packages) \
    && apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $packages \
    && rm -rf /var/lib/apt/lists/*
COPY image/lvmlocal.conf /etc/lvm/lvmlocal.conf
COPY --from=build /out/berth-agent /out/berth-controller /usr/local/bin/
USER 65532:65532
ARG BERTH_COMMIT
LABEL org.opencontainers.image.title="Berth" \
      org.opencontainers.image.revision="${BERTH_COMMIT}" \
      org.opencontainers.image.description="Node-local volume provisioner for Kubernetes: berth-agent and berth-controller" \
      org.opencontainers.image.licenses="Apache-2.0"
CMD ["berth-controller", "--help"]
