#!/usr/bin/env bash
# Makes the local base image the container tests build the Dockerfile on:
# Debian bookworm (minbase) plus iptables (for `rampart init`) and
# python3-minimal (for the test's app containers only). No registry is
# reachable in CI, so the image comes from debootstrap; the rootfs tarball
# is cached under $RAMPART_CI_CACHE (default /var/tmp/rampart-ci) so that
# a rerun takes seconds.
#
# Usage: tests/container/base-image.sh [IMAGE]   (default localhost/rampart-ci/debian:bookworm)
set -euo pipefail
image=${1:-localhost/rampart-ci/debian:bookworm}
cache=${RAMPART_CI_CACHE:-/var/tmp/rampart-ci}
tarball=$cache/debian-bookworm-rootfs.tar

if podman image exists "$image"; then
  exit 0
fi
mkdir -p "$cache"
if [ ! -s "$tarball" ]; then
  rootfs=$(mktemp -d "$cache/rootfs.XXXXXX")
  debootstrap --variant=minbase --include=iptables,python3-minimal \
    bookworm "$rootfs" http://deb.debian.org/debian >"$cache/debootstrap.log" 2>&1 \
    || { tail -20 "$cache/debootstrap.log" >&2; rm -rf "$rootfs"; exit 1; }
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  tar -C "$rootfs" -cf "$tarball.tmp" .
  mv "$tarball.tmp" "$tarball"
  rm -rf "$rootfs"
fi
podman import "$tarball" "$image" >/dev/null
