#!/usr/bin/env bash
# Builds the real Kubernetes control plane the tests need: `kube-apiserver`
# from k8s.io/kubernetes and `etcd` from go.etcd.io/etcd/server/v3, at
# pinned versions, into
#   $RAMPART_PEERS_DIR/kube-<K8S_VERSION>/bin/kube-apiserver
#   $RAMPART_PEERS_DIR/etcd-<ETCD_VERSION>/bin/etcd
# Skips each build when its binary is already there (the warm cache).
#
# k8s.io/kubernetes cannot be `go install`ed: its go.mod replaces every
# k8s.io/* staging module (api, apimachinery, client-go, ...) with a local
# folder and requires them at v0.0.0. So a throwaway module requires
# k8s.io/kubernetes and replaces each of those staging modules with the
# matching published v0.<minor>.<patch> release (read from kubernetes' own
# go.mod, so the list follows the version).
# The first build is long on 2 cores (see tests/README.md for timings).
set -euo pipefail

K8S_VERSION="${RAMPART_K8S_VERSION:-v1.36.3}"
ETCD_VERSION="${RAMPART_ETCD_VERSION:-v3.7.3}"
PEERS="${RAMPART_PEERS_DIR:-/var/tmp/rampart-peers}"
export GOFLAGS="${GOFLAGS:+$GOFLAGS }-trimpath -buildvcs=false"
export GOTOOLCHAIN=local
export CGO_ENABLED=0
command -v go >/dev/null || PATH="$PATH:/usr/local/go/bin"

kube_bin="$PEERS/kube-$K8S_VERSION/bin"
etcd_bin="$PEERS/etcd-$ETCD_VERSION/bin"

build_etcd() {
  if [ -x "$etcd_bin/etcd" ]; then
    echo "peer-kube: etcd $ETCD_VERSION already built"
    return
  fi
  local src="$PEERS/src/etcd-$ETCD_VERSION"
  rm -rf "$src"
  mkdir -p "$src" "$etcd_bin"
  cd "$src"
  go mod init rampart-peer-etcd >/dev/null 2>&1
  # server/v3 carries the `etcd` main package (a wrapper of etcdmain).
  go get -tool "go.etcd.io/etcd/server/v3@$ETCD_VERSION"
  go build -o "$etcd_bin/etcd.tmp" go.etcd.io/etcd/server/v3
  mv "$etcd_bin/etcd.tmp" "$etcd_bin/etcd"
  echo "peer-kube: built $etcd_bin/etcd"
}

build_kube() {
  if [ -x "$kube_bin/kube-apiserver" ]; then
    echo "peer-kube: kube-apiserver $K8S_VERSION already built"
    return
  fi
  local src="$PEERS/src/kube-$K8S_VERSION"
  local staging="v0.${K8S_VERSION#v1.}"
  rm -rf "$src"
  mkdir -p "$src" "$kube_bin"
  cd "$src"
  go mod init rampart-peer-kube >/dev/null 2>&1
  local gomod
  gomod="$(go mod download -json "k8s.io/kubernetes@$K8S_VERSION" | sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",\{0,1\}$/\1/p')"
  [ -s "$gomod" ] || {
    echo "peer-kube: no go.mod for k8s.io/kubernetes@$K8S_VERSION" >&2
    exit 1
  }
  # Every `k8s.io/X => ./staging/src/k8s.io/X` replace of kubernetes' go.mod.
  local mods
  mods="$(sed -n 's#^[[:space:]]*\(replace[[:space:]]\{1,\}\)\{0,1\}\(k8s.io/[A-Za-z0-9._-]*\)[[:space:]]*=>[[:space:]]*\./staging/.*#\2#p' "$gomod" | sort -u)"
  [ -n "$mods" ] || {
    echo "peer-kube: found no staging replaces in $gomod" >&2
    exit 1
  }
  local args=()
  for m in $mods; do
    args+=("-replace=$m=$m@$staging")
  done
  go mod edit "${args[@]}"
  go get -tool "k8s.io/kubernetes/cmd/kube-apiserver@$K8S_VERSION"
  go build -o "$kube_bin/kube-apiserver.tmp" k8s.io/kubernetes/cmd/kube-apiserver
  mv "$kube_bin/kube-apiserver.tmp" "$kube_bin/kube-apiserver"
  echo "peer-kube: built $kube_bin/kube-apiserver"
}

build_etcd
build_kube
