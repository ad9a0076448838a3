#!/usr/bin/env bash
# Builds the images every node imports, as OCI archives, without a registry:
#   registry.k8s.io/pause:3.10   the sandbox image: Debian's static catatonit in pause mode
#   cryopod.local/busybox:e2e    test workloads: Debian's static busybox
# usage: images.sh OUT_DIR
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
out=$1
mkdir -p "$out"
# catatonit and busybox-static come with the host packages (hack/ensure-node-packages.sh).
cargo build --quiet --locked -p cryopod-e2e --bin oci-image --manifest-path "$REPO_ROOT/Cargo.toml"
oci_image="${CARGO_TARGET_DIR:-$REPO_ROOT/target}/debug/oci-image"

"$oci_image" --name registry.k8s.io/pause:3.10 --out "$out/pause.tar" \
  --file /usr/bin/catatonit:/pause --entrypoint /pause --entrypoint -P >/dev/null

# A static test workload that holds a file lock (e2e/lock-holder).
RUSTFLAGS="-C target-feature=+crt-static" cargo build --quiet --locked -p cryopod-lock-holder \
  --target x86_64-unknown-linux-gnu --manifest-path "$REPO_ROOT/Cargo.toml"
lock_holder="${CARGO_TARGET_DIR:-$REPO_ROOT/target}/x86_64-unknown-linux-gnu/debug/cryopod-lock-holder"

busybox_args=(--name cryopod.local/busybox:e2e --out "$out/busybox.tar" --file /bin/busybox:/bin/busybox
  --file "$lock_holder:/bin/lock-holder"
  --dir /tmp --env PATH=/bin --cmd sh)
for applet in sh ash cat echo sleep ls mkdir rm touch date seq grep head tail wc nc httpd wget \
  ps kill env hostname ip cut tr sha256sum dd true false test chmod sync; do
  busybox_args+=(--symlink "/bin/$applet=busybox")
done
"$oci_image" "${busybox_args[@]}" >/dev/null
