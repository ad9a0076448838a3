#!/usr/bin/env bash
# Builds the VM node's disk image once and prints its cache directory,
#   $CRYOPOD_CACHE/vm-<suite>-<gen>-<hash>/
#     vmlinuz, initrd.img   the suite's Debian kernel and its initramfs (from the rootfs)
#     rootfs.qcow2          ext4 root filesystem (qcow2, used read-only as a backing file)
#     manifest.txt          package versions inside, kernel command line basics, build time
# The root filesystem is made by mmdebstrap from Debian $VM_SUITE: systemd as PID 1,
# containerd 2.x (systemd cgroup driver), runc, CRIU, the CNI plugins, the kubelet's
# host tools, the kernel, and the files of hack/vm/guest (containerd's config, the
# command-channel agent). The hash covers this script and hack/vm/guest, so editing
# either rebuilds the image; older images of the same suite are removed.
source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"

VM_DIR="$HACK_DIR/vm"
# Host tools: mmdebstrap builds the rootfs, mke2fs packs it, qemu-img converts it.
host_packages=(mmdebstrap e2fsprogs qemu-utils qemu-system-x86)
missing=()
for p in "${host_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  log "installing host packages: ${missing[*]}"
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi

guest_packages=(
  # PID 1 and the basics of a booted node
  systemd systemd-sysv udev dbus kmod procps util-linux mount e2fsprogs libcap2-bin
  linux-image-amd64 initramfs-tools zstd
  # the container runtime
  containerd runc criu containernetworking-plugins
  # what the kubelet, kube-proxy and CRIU's network lock use
  iproute2 iptables nftables conntrack ethtool socat ca-certificates
  # test images are built inside the guest from these
  busybox-static catatonit
)
IMAGE_SIZE=${CRYOPOD_VM_IMAGE_SIZE:-4G}   # ext4 size; the qcow2 holds only what is used

hash=$(cat "$VM_DIR/ensure-image.sh" <(cd "$VM_DIR/guest" && find . -type f | sort | xargs sha256sum) |
       sha256sum | cut -c1-8)
dir="$CRYOPOD_CACHE/vm-$VM_SUITE-$VM_GEN-$hash"

version_at_least() { [[ "$(printf '%s\n%s\n' "$2" "$1" | sort -V | head -1)" == "$2" ]]; }
check_image() {
  local f v
  for f in vmlinuz initrd.img rootfs.qcow2 manifest.txt; do
    [[ -s "$dir/$f" ]] || { log "$dir/$f is missing"; return 1; }
  done
  v=$(awk '$1 == "criu" {print $2}' "$dir/manifest.txt")
  version_at_least "$v" "$CRIU_MIN_VERSION" || { log "criu '$v' in the image is older than $CRIU_MIN_VERSION"; return 1; }
  v=$(awk '$1 == "containerd" {print $2}' "$dir/manifest.txt")
  version_at_least "$v" "$CONTAINERD_MIN_VERSION" || { log "containerd '$v' in the image is older than $CONTAINERD_MIN_VERSION"; return 1; }
}

if [[ ! -f "$dir/.complete" ]]; then
  start=$SECONDS
  log "building the VM image from Debian $VM_SUITE into $dir"
  uri=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null ||
        awk '/^deb / {print $2; exit}' /etc/apt/sources.list)
  [[ -n "$uri" ]] || die "cannot find the Debian mirror in the host's apt sources"
  rm -rf "$dir.tmp" && mkdir -p "$dir.tmp"
  root="$dir.tmp/root"
  include=$(IFS=,; echo "${guest_packages[*]}")
  # Root mode mounts /proc, /sys and /dev into the rootfs while it installs; a private
  # mount namespace keeps those mounts away from the host and takes them along when it ends.
  unshare --mount --propagation private -- mmdebstrap --mode=root --variant=minbase --format=directory \
    --include="$include" \
    --aptopt='Acquire::Retries "3"' \
    `# The machine's mirror is a frozen snapshot whose Release files have expired;` \
    `# signatures are still checked.` \
    --aptopt='Acquire::Check-Valid-Until "false"' \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/locale/*' \
    --essential-hook='mkdir -p "$1/etc/initramfs-tools/conf.d"' \
    --essential-hook="copy-in $VM_DIR/guest/etc/initramfs-tools/conf.d/cryopod.conf /etc/initramfs-tools/conf.d/" \
    --customize-hook="sync-in $VM_DIR/guest /" \
    --customize-hook='chroot "$1" systemctl enable cryopod-vm-agent.service cryopod-vm-net.service' \
    --customize-hook='chroot "$1" systemctl set-default multi-user.target' \
    --customize-hook='chroot "$1" systemctl mask apt-daily.timer apt-daily-upgrade.timer dpkg-db-backup.timer e2scrub_all.timer fstrim.timer' \
    `# First-boot work done now: ldconfig and the journal catalog (ConditionNeedsUpdate).` \
    --customize-hook='chroot "$1" ldconfig && chroot "$1" journalctl --update-catalog && touch "$1/etc/.updated" "$1/var/.updated"' \
    --customize-hook='chroot "$1" dpkg-query -W -f="\${Package} \${Version}\n" > "$1/root/packages.txt"' \
    "$VM_SUITE" "$root" "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $uri $VM_SUITE main" >&2
  # The kernel and the initramfs that the kernel's package generated inside the rootfs.
  kernel=$(cd "$root/boot" && ls vmlinuz-* | sort -V | tail -1)
  [[ -n "$kernel" ]] || die "no kernel in $root/boot"
  cp "$root/boot/$kernel" "$dir.tmp/vmlinuz"
  cp "$root/boot/initrd.img-${kernel#vmlinuz-}" "$dir.tmp/initrd.img" || die "no initramfs for $kernel"
  {
    echo "kernel ${kernel#vmlinuz-}"
    for p in systemd containerd runc criu containernetworking-plugins linux-image-amd64; do
      awk -v p="$p" '$1 == p {print; f=1} END {exit !f}' "$root/root/packages.txt" || die "$p is not in the image"
    done
    grep -E '^CONFIG_(EXT4_FS|VIRTIO_BLK|VIRTIO_PCI|VIRTIO_NET|NET_9P_VIRTIO|9P_FS|CGROUP_BPF|CHECKPOINT_RESTORE|USERFAULTFD|MEM_SOFT_DIRTY)=' \
      "$root/boot/config-${kernel#vmlinuz-}" | sed 's/^/config /'
  } > "$dir.tmp/manifest.txt"
  # ext4 straight from the directory (no loop device, no mount), then qcow2.
  mke2fs -q -t ext4 -L cryopod-vm -d "$root" "$dir.tmp/rootfs.raw" "$IMAGE_SIZE" >&2
  qemu-img convert -O qcow2 "$dir.tmp/rootfs.raw" "$dir.tmp/rootfs.qcow2" >&2
  rm -rf "$dir.tmp/rootfs.raw" "$root"
  echo "built in $((SECONDS - start)) s on $(date -u +%FT%TZ)" >> "$dir.tmp/manifest.txt"
  for old in "$CRYOPOD_CACHE/vm-$VM_SUITE"-*; do
    [[ -d "$old" && "$old" != "$dir.tmp" ]] || continue
    log "removing the older VM image $old"
    rm -rf "$old"
  done
  mv "$dir.tmp" "$dir"
  check_image || { rm -rf "$dir"; exit 1; }
  touch "$dir/.complete"
  log "VM image built in $((SECONDS - start)) s: $(du -sh "$dir" | cut -f1) in $dir"
fi
check_image
printf '%s\n' "$dir"
