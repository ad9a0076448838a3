#!/usr/bin/env bash
# Installs, system-wide from the host's own Debian suite, what the tests and the local
# cluster use on the host: runc, iptables, conntrack, ..., perl (SysV test processes),
# age (encryption checks), ca-certificates (the agent image's roots) and the DejaVu
# font (the benchmark's plot).
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

host_packages=(runc iptables conntrack iproute2 util-linux catatonit busybox-static socat kmod procps curl openssl
  perl age ca-certificates fonts-dejavu-core)

missing=()
for p in "${host_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  log "installing host packages: ${missing[*]}"
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi
