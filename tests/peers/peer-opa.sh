#!/usr/bin/env bash
# Builds the real OPA (`opa`), pinned, from its Go module, for the
# differential Rego tests (tests/rego_opa.rs): Rampart's regorus-based
# engine and OPA evaluate the same policies on the same input documents and
# must agree. Installs into $RAMPART_PEERS_DIR/opa-<version>/bin and does
# nothing when the binary is already there.
set -euo pipefail
version=v1.22.4
peers="${RAMPART_PEERS_DIR:-/var/tmp/rampart-peers}"
dest="$peers/opa-$version"
if [ -x "$dest/bin/opa" ]; then
  echo "peer-opa: $dest/bin/opa already built"
  exit 0
fi
export PATH="$PATH:/usr/local/go/bin"
export GOFLAGS=-trimpath
# OPA's module has no replace directives, so `go install module@version`
# builds it directly; GOBIN puts the binary in the versioned cache.
tmp="$dest.tmp.$$"
rm -rf "$tmp"
mkdir -p "$tmp/bin"
trap 'rm -rf "$tmp"' EXIT
GOBIN="$tmp/bin" CGO_ENABLED=0 go install "github.com/open-policy-agent/opa@$version"
"$tmp/bin/opa" version | grep -q "Version: ${version#v}" || {
  echo "peer-opa: built opa does not report version $version" >&2
  exit 1
}
rm -rf "$dest"
mv "$tmp" "$dest"
trap - EXIT
echo "peer-opa: installed $dest/bin/opa"
