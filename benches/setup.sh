#!/usr/bin/env bash
# Installs what the latency harness's comparison topologies need (Debian):
# nginx and HAProxy, run by the harness as plain processes with generated
# configurations, the font the plots are drawn with, and for the
# transparent-mode workload (root only) ip, iptables and setpriv.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
need=()
for pkg in nginx haproxy fonts-dejavu-core iproute2 iptables util-linux; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if ((${#need[@]})); then
  apt-get update -qq
  apt-get install -y -qq "${need[@]}" >/dev/null
fi
