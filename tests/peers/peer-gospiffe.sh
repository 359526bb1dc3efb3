#!/usr/bin/env bash
# Builds rampart-gospiffe (tests/peers/gospiffe: our own small client on
# go-spiffe v2, the reference SPIFFE Workload API and mTLS library) into
# $RAMPART_PEERS_DIR/gospiffe-<version>/bin. The client's source lives in
# this repository, so the cache is keyed by the go-spiffe version and
# rebuilt when the source's hash changes.
set -euo pipefail
version=v2.9.0
here="$(cd "$(dirname "$0")" && pwd)"
peers="${RAMPART_PEERS_DIR:-/var/tmp/rampart-peers}"
dest="$peers/gospiffe-$version"
grep -q "github.com/spiffe/go-spiffe/v2 $version\$" "$here/gospiffe/go.mod" || {
  echo "peer-gospiffe: tests/peers/gospiffe/go.mod does not pin go-spiffe $version" >&2
  exit 1
}
hash=$(cat "$here"/gospiffe/go.mod "$here"/gospiffe/go.sum "$here"/gospiffe/*.go | sha256sum | cut -c1-16)
if [ -x "$dest/bin/rampart-gospiffe" ] && [ "$(cat "$dest/source-hash" 2>/dev/null)" = "$hash" ]; then
  echo "peer-gospiffe: $version already built in $dest/bin"
  exit 0
fi
rm -rf "$dest.tmp"
mkdir -p "$dest.tmp/bin"
export GOFLAGS="${GOFLAGS:+$GOFLAGS }-trimpath -buildvcs=false"
export GOTOOLCHAIN=local
(cd "$here/gospiffe" && go build -mod=readonly -o "$dest.tmp/bin/rampart-gospiffe" .)
echo "$hash" >"$dest.tmp/source-hash"
rm -rf "$dest"
mv "$dest.tmp" "$dest"
echo "peer-gospiffe: built $dest/bin/rampart-gospiffe"
