#!/usr/bin/env bash
# Builds the images every node imports, as OCI archives, without a registry:
#   registry.k8s.io/pause:3.10   the sandbox image: Debian's static catatonit in pause mode
#   cryopod.local/busybox:e2e    test workloads: Debian's static busybox, a lock holder and
#                                a memory dirtier (the benchmark's workload)
#   cryopod.local/cryopod-operator:<appVersion>    the operator, a static binary
#   cryopod.local/cryopod-node-agent:<appVersion>  the agent and runtime handler, static,
#                                                  with busybox for nsenter
# usage: images.sh OUT_DIR
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
out=$1
mkdir -p "$out"
# catatonit and busybox-static come with the host packages (hack/ensure-node-packages.sh).
cargo build --quiet --locked -p cryopod-e2e --bin oci-image --manifest-path "$REPO_ROOT/Cargo.toml"
oci_image="${CARGO_TARGET_DIR:-$REPO_ROOT/target}/debug/oci-image"

"$oci_image" --name registry.k8s.io/pause:3.10 --out "$out/pause.tar" \
  --file /usr/bin/catatonit:/pause --entrypoint /pause --entrypoint -P >/dev/null

# Static binaries: cryopod's, and a test workload that holds a file lock (e2e/lock-holder).
# kubectl-cryopod goes in no image: its static binary, beside the others, is what SREs
# put on their PATH.
# With --target, the static flag applies to these binaries only, not to build scripts.
RUSTFLAGS="-C target-feature=+crt-static" cargo build --quiet --locked --profile image \
  -p cryopod-operator -p cryopod-node-agent -p cryopod-lock-holder -p cryopod-memory-dirtier -p kubectl-cryopod \
  --target x86_64-unknown-linux-gnu --manifest-path "$REPO_ROOT/Cargo.toml"
static="${CARGO_TARGET_DIR:-$REPO_ROOT/target}/x86_64-unknown-linux-gnu/image"
lock_holder="$static/cryopod-lock-holder"
version=$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' "$REPO_ROOT/charts/cryopod/Chart.yaml")
[[ -n $version ]] || die "no appVersion in charts/cryopod/Chart.yaml"

"$oci_image" --name "cryopod.local/cryopod-operator:$version" --out "$out/cryopod-operator.tar" \
  --file "$static/cryopod-operator:/usr/local/bin/cryopod-operator" \
  --entrypoint /usr/local/bin/cryopod-operator >/dev/null
# The agent runs runc and CRIU on the node through nsenter (busybox's).
agent_args=(--name "cryopod.local/cryopod-node-agent:$version" --out "$out/cryopod-node-agent.tar"
  --file "$static/cryopod-node-agent:/usr/local/bin/cryopod-node-agent"
  --file "$static/cryopod-runc:/usr/local/bin/cryopod-runc"
  --file /bin/busybox:/bin/busybox --dir /tmp
  # Object stores over HTTPS are verified against the host's roots.
  --file /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt
  --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
  --entrypoint /usr/local/bin/cryopod-node-agent)
for applet in sh nsenter cat ls; do
  agent_args+=(--symlink "/bin/$applet=busybox")
done
"$oci_image" "${agent_args[@]}" >/dev/null

# /escape -> / is the security tests' attack: a tenant's image may link anywhere.
busybox_args=(--name cryopod.local/busybox:e2e --out "$out/busybox.tar" --file /bin/busybox:/bin/busybox
  --file "$lock_holder:/bin/lock-holder" --file "$static/cryopod-memory-dirtier:/bin/memory-dirtier"
  --dir /tmp --symlink /escape=/ --env PATH=/bin --cmd sh)
for applet in sh ash cat echo sleep ls mkdir rm touch date seq grep head tail wc nc httpd wget \
  ps kill env hostname ip cut tr sha256sum dd true false test chmod sync; do
  busybox_args+=(--symlink "/bin/$applet=busybox")
done
"$oci_image" "${busybox_args[@]}" >/dev/null
