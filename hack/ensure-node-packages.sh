#!/usr/bin/env bash
# Installs what a node needs and prints the directory of the private prefix:
#   - from the host's own Debian suite, system-wide: runc, iptables, conntrack, ...
#   - from Debian $NODE_PACKAGES_SUITE, extracted (never installed) into
#     $CRYOPOD_CACHE/node-packages-<suite>-<gen>: containerd 2.x, CRIU 4.2+ with its
#     libraries and a loader, etcd, CNI plugins, checkpointctl.
# The prefix's bin/ holds containerd, ctr, the shim, etcd, checkpointctl and a `criu`
# wrapper that runs CRIU through the prefix's own ld.so and libraries.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

suite_packages=(containerd etcd-server containernetworking-plugins checkpointctl criu)

"$HACK_DIR/ensure-host-packages.sh"

prefix="$CRYOPOD_CACHE/node-packages-$NODE_PACKAGES_SUITE-$NODE_PACKAGES_GEN"

version_at_least() { [[ "$(printf '%s\n%s\n' "$2" "$1" | sort -V | head -1)" == "$2" ]]; }
# check_prefix: CRIU runs and is recent enough, containerd is 2.x.
check_prefix() {
  local criu_version containerd_version
  criu_version=$("$prefix/bin/criu" --version | awk '/^Version:/ {print $2}')
  version_at_least "$criu_version" "$CRIU_MIN_VERSION" || { log "criu '$criu_version' is older than $CRIU_MIN_VERSION or does not run"; return 1; }
  containerd_version=$(cat "$prefix/containerd.version")
  version_at_least "$containerd_version" "$CONTAINERD_MIN_VERSION" || { log "containerd $containerd_version is older than $CONTAINERD_MIN_VERSION"; return 1; }
}
if [[ ! -f "$prefix/.complete" ]]; then
  log "fetching ${suite_packages[*]} from Debian $NODE_PACKAGES_SUITE into $prefix"
  apt_dir="$CRYOPOD_CACHE/apt-$NODE_PACKAGES_SUITE"
  mkdir -p "$apt_dir/lists/partial" "$apt_dir/archives/partial"
  # Same mirror as the host's own sources, another suite.
  uri=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null ||
        awk '/^deb / {print $2; exit}' /etc/apt/sources.list)
  [[ -n "$uri" ]] || die "cannot find the Debian mirror in the host's apt sources"
  echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $uri $NODE_PACKAGES_SUITE main" > "$apt_dir/sources.list"
  apt_opts=(-o "Dir::Etc::SourceList=$apt_dir/sources.list" -o Dir::Etc::SourceParts=/nonexistent
            -o "Dir::State::Lists=$apt_dir/lists" -o "Dir::Cache::Archives=$apt_dir/archives"
            -o Dir::State::Status=/dev/null -o APT::Architecture=amd64 -qq)
  apt-get "${apt_opts[@]}" update >&2
  # The suite packages, plus every library CRIU needs (its loader comes with libc6).
  mapfile -t debs < <(
    { printf '%s\n' "${suite_packages[@]}"
      apt-cache "${apt_opts[@]}" depends --recurse --no-recommends --no-suggests --no-conflicts \
        --no-breaks --no-replaces --no-enhances criu | grep -E '^(lib|gcc-)[a-z0-9.+-]*$'
    } | sort -u)
  rm -rf "$prefix.tmp" && mkdir -p "$prefix.tmp/debs" "$prefix.tmp/root" "$prefix.tmp/bin"
  # apt drops to the _apt user for downloads; let it write there.
  chown _apt "$prefix.tmp/debs" 2>/dev/null || true
  (cd "$prefix.tmp/debs" && apt-get "${apt_opts[@]}" download "${debs[@]}" >&2)
  for deb in "$prefix.tmp"/debs/*.deb; do dpkg-deb -x "$deb" "$prefix.tmp/root"; done
  dpkg-deb -f "$prefix.tmp"/debs/criu_*.deb Version > "$prefix.tmp/criu.version"
  dpkg-deb -f "$prefix.tmp"/debs/containerd_*.deb Version > "$prefix.tmp/containerd.version"
  rm -rf "$prefix.tmp/debs"
  r="$prefix/root"
  # criu and checkpointctl need a newer libc than the host's: run them through the
  # prefix's own loader and libraries. The rest links against the host libc.
  for b in usr/sbin/criu usr/bin/checkpointctl; do
    cat > "$prefix.tmp/bin/${b##*/}" <<WRAPPER
#!/bin/sh
exec $r/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2 --library-path $r/usr/lib/x86_64-linux-gnu:$r/lib/x86_64-linux-gnu $r/$b "\$@"
WRAPPER
    chmod +x "$prefix.tmp/bin/${b##*/}"
  done
  for b in containerd containerd-shim-runc-v2 ctr etcd; do
    [[ -x "$prefix.tmp/root/usr/bin/$b" ]] || die "$b missing from the $NODE_PACKAGES_SUITE packages"
    ln -s "$r/usr/bin/$b" "$prefix.tmp/bin/$b"
  done
  ln -s "$r/usr/lib/cni" "$prefix.tmp/cni-bin"
  # The wrappers point at the final prefix: move it there, check it, then mark it complete.
  rm -rf "$prefix" && mv "$prefix.tmp" "$prefix"
  check_prefix || { rm -rf "$prefix"; exit 1; }
  touch "$prefix/.complete"
fi
check_prefix
printf '%s\n' "$prefix"
