#!/bin/bash
# Runs in the guest (vm_boot puts it in the share, /mnt/host/bin): packs a directory
# as a one-layer OCI archive, as e2e/cluster/images.sh does on the host, and imports it.
# usage: oci-image.sh NAMESPACE NAME ROOTFS_DIR ENTRYPOINT...
set -euo pipefail
ns=$1 name=$2 rootfs=$3; shift 3
d=$(mktemp -d)
trap 'rm -rf "$d"' EXIT
mkdir -p "$d/oci/blobs/sha256"
tar --sort=name --owner=0 --group=0 --mtime=@0 -C "$rootfs" -cf "$d/layer.tar" .
blob() { local s; s=$(sha256sum "$1" | cut -d' ' -f1); cp "$1" "$d/oci/blobs/sha256/$s"; echo "$s"; }
size() { stat -c %s "$1"; }
json_args() { local a out=; for a in "$@"; do out+="${out:+,}\"$a\""; done; echo "[$out]"; }
layer=$(blob "$d/layer.tar")
printf '{"architecture":"amd64","os":"linux","config":{"Env":["PATH=/bin"],"Entrypoint":%s},"rootfs":{"type":"layers","diff_ids":["sha256:%s"]}}' \
  "$(json_args "$@")" "$layer" > "$d/config.json"
config=$(blob "$d/config.json")
printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:%s","size":%d},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"sha256:%s","size":%d}]}' \
  "$config" "$(size "$d/config.json")" "$layer" "$(size "$d/layer.tar")" > "$d/manifest.json"
manifest=$(blob "$d/manifest.json")
printf '{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:%s","size":%d,"platform":{"architecture":"amd64","os":"linux"},"annotations":{"io.containerd.image.name":"%s","org.opencontainers.image.ref.name":"%s"}}]}' \
  "$manifest" "$(size "$d/manifest.json")" "$name" "${name##*:}" > "$d/oci/index.json"
echo '{"imageLayoutVersion":"1.0.0"}' > "$d/oci/oci-layout"
tar -C "$d/oci" -cf "$d/image.tar" oci-layout index.json blobs
ctr -n "$ns" images import "$d/image.tar" >/dev/null
ctr -n "$ns" images ls -q | grep -qx "$name"
echo "$name"
