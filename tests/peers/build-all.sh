#!/usr/bin/env bash
# Builds every real test peer (SPIRE, OPA, kube-apiserver, etcd, go-spiffe
# clients, ...) from its Go module, once per version: each
# tests/peers/<name>.sh installs its binaries under
# $RAMPART_PEERS_DIR/<name>-<version>/bin and skips the build when they are
# already there. `.ci/run` calls this before the tests; the tests find the
# binaries through tests/peers/env.sh (sourced) or RAMPART_PEERS_DIR.
# Go is only for these test peers: the product stays pure Rust.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
export RAMPART_PEERS_DIR="${RAMPART_PEERS_DIR:-/var/tmp/rampart-peers}"
mkdir -p "$RAMPART_PEERS_DIR"
for script in "$here"/peer-*.sh; do
  [ -e "$script" ] || continue
  start=$(date +%s)
  echo "peers: $(basename "$script")"
  bash "$script"
  echo "peers: $(basename "$script") done in $(($(date +%s) - start)) s"
done
