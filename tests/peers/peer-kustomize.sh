#!/usr/bin/env bash
# Builds rampart-kustomize (tests/peers/kustomize: our own few lines on
# sigs.k8s.io/kustomize/api, the library behind `kubectl kustomize`) into
# $RAMPART_PEERS_DIR/kustomize-<version>/bin, so that the tests render
# every kustomization in deploy/ offline, as kubectl would. The source lives
# in this repository, so the cache is keyed by the kustomize version and
# rebuilt when the source's hash changes.
set -euo pipefail
version=v0.21.2
here="$(cd "$(dirname "$0")" && pwd)"
peers="${RAMPART_PEERS_DIR:-/var/tmp/rampart-peers}"
dest="$peers/kustomize-$version"
grep -q "sigs.k8s.io/kustomize/api $version\$" "$here/kustomize/go.mod" || {
  echo "peer-kustomize: tests/peers/kustomize/go.mod does not pin kustomize/api $version" >&2
  exit 1
}
hash=$(cat "$here"/kustomize/go.mod "$here"/kustomize/go.sum "$here"/kustomize/*.go | sha256sum | cut -c1-16)
if [ -x "$dest/bin/rampart-kustomize" ] && [ "$(cat "$dest/source-hash" 2>/dev/null)" = "$hash" ]; then
  echo "peer-kustomize: $version already built in $dest/bin"
  exit 0
fi
rm -rf "$dest.tmp"
mkdir -p "$dest.tmp/bin"
export GOFLAGS="${GOFLAGS:+$GOFLAGS }-trimpath -buildvcs=false"
export GOTOOLCHAIN=local
(cd "$here/kustomize" && go build -mod=readonly -o "$dest.tmp/bin/rampart-kustomize" .)
echo "$hash" >"$dest.tmp/source-hash"
rm -rf "$dest"
mv "$dest.tmp" "$dest"
echo "peer-kustomize: built $dest/bin/rampart-kustomize"
