#!/usr/bin/env bash
# Builds spire-server and spire-agent (SPIRE, github.com/spiffe/spire) at a
# pinned version into $RAMPART_PEERS_DIR/spire-<version>/bin, once: the
# tests in tests/spire*.rs run them as the real SPIRE. The module proxy has
# no version list for SPIRE, so `go install ...@version` is refused; a
# throwaway module records the two commands as tools at that version and
# `go install` builds them from its module graph.
set -euo pipefail
version=v1.13.3
peers="${RAMPART_PEERS_DIR:-/var/tmp/rampart-peers}"
dest="$peers/spire-$version"
if [ -x "$dest/bin/spire-server" ] && [ -x "$dest/bin/spire-agent" ]; then
  echo "peer-spire: $version already built in $dest/bin"
  exit 0
fi
src="$peers/src/spire-$version"
rm -rf "$src" "$dest.tmp"
mkdir -p "$src" "$dest.tmp/bin"
cd "$src"
export GOFLAGS="${GOFLAGS:+$GOFLAGS }-trimpath -buildvcs=false"
export GOTOOLCHAIN=local
go mod init rampart-peers/spire >/dev/null 2>&1
go get -tool "github.com/spiffe/spire/cmd/spire-server@$version"
go get -tool "github.com/spiffe/spire/cmd/spire-agent@$version"
GOBIN="$dest.tmp/bin" go install \
  github.com/spiffe/spire/cmd/spire-server \
  github.com/spiffe/spire/cmd/spire-agent
rm -rf "$dest"
mv "$dest.tmp" "$dest"
"$dest/bin/spire-server" --version 2>&1 | sed 's/^/peer-spire: spire-server /'
