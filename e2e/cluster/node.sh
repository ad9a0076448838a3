#!/usr/bin/env bash
# One worker node: runs inside the node's own network namespace and a fresh mount
# namespace (up.sh starts it with unshare + nsenter), starts containerd, imports the
# images, then runs kubelet and kube-proxy until it is told to stop. On SIGTERM it
# stops them, kills every container of the node and containerd, and exits; its mount
# namespace, with every mount the node made, goes with it.
#
# usage: node.sh NODE KUBE_BIN_DIR NODE_PACKAGES_PREFIX IMAGE_DIR
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
node=$1 kube_bin=$2 packages=$3 images=$4
dir="$TESTBED/$node"
sock="$dir/containerd/containerd.sock"
# CRIU and the containerd binaries from the private prefix come first; runc is the host's.
export PATH="$packages/bin:$PATH"
ctr=(ctr --address "$sock" --namespace k8s.io)

# Teardown kills whatever shares this mount namespace, so it must be a private one.
[[ $(readlink /proc/self/ns/mnt) != "$(readlink /proc/1/ns/mnt)" ]] || die "$node: not in a private mount namespace"
readlink /proc/self/ns/mnt > "$PIDS/$node.mntns"
# Mounts made by containerd and kubelet propagate within this namespace only.
mount --make-rshared /
# containerd keeps pod network namespaces in /run/netns, shim sockets and FIFOs in
# /run/containerd and its NRI socket in /run/nri; private tmpfs copies keep them per
# node and gone with the node (two nodes' containerd starting at once once raced for
# one /run/nri/nri.sock: "bind: address already in use").
for d in /run/netns /run/containerd /run/nri; do
  mkdir -p "$d"
  mount -t tmpfs -o mode=0755 "cryopod-$node" "$d"
done
ip link set lo up
sysctl -qw net.ipv4.ip_forward=1 net.bridge.bridge-nf-call-iptables=1 net.bridge.bridge-nf-call-ip6tables=1

children=()
stop() {
  log "$node: stopping"
  for pid in "${children[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  # Every container process of this node sits under the node's cgroup root.
  local procs
  procs=$(find "/sys/fs/cgroup/pids$(cgroup_root "$node")" -name cgroup.procs -exec cat {} + 2>/dev/null || true)
  for pid in $procs; do kill -KILL "$pid" 2>/dev/null || true; done
  wait "${children[@]}" 2>/dev/null || true
  # What is left in this mount namespace (containerd shims) goes too.
  local me
  me=$(readlink /proc/self/ns/mnt)
  for p in /proc/[0-9]*; do
    local pid=${p#/proc/}
    [[ $pid == "$$" || $pid == "$BASHPID" ]] && continue
    [[ $(readlink "$p/ns/mnt" 2>/dev/null) == "$me" ]] && kill -KILL "$pid" 2>/dev/null || true
  done
  exit 0
}
trap stop TERM INT

# containerd
containerd --config "$dir/containerd.toml" >"$LOGS/$node-containerd.log" 2>&1 &
children+=($!)
echo "${children[-1]}" > "$PIDS/$node-containerd.pid"
deadline=$((SECONDS + 60))
until "${ctr[@]}" version >/dev/null 2>&1; do
  ((SECONDS < deadline)) || die "$node: containerd did not start; see $LOGS/$node-containerd.log"
  sleep 0.2
done
# The paths the Helm chart mounts by default, as this node's own: the runtime socket and
# the agent's state directory (where this node's runtime handler reads restores).
touch /run/containerd/containerd.sock
mount --bind "$sock" /run/containerd/containerd.sock
mkdir -p /var/lib/cryopod "$dir/cryopod"
mount --bind "$dir/cryopod" /var/lib/cryopod
for image in "$images"/*.tar; do
  "${ctr[@]}" images import "$image" >/dev/null || die "$node: cannot import $image"
done

"$kube_bin/kubelet" --config="$dir/kubelet.yaml" --kubeconfig="$PKI/kubelet-$node.kubeconfig" \
  --hostname-override="$node" --node-ip="$(node_ip "$node")" --root-dir="$dir/kubelet" \
  --v=1 >"$LOGS/$node-kubelet.log" 2>&1 &
children+=($!)
echo "${children[-1]}" > "$PIDS/$node-kubelet.pid"

"$kube_bin/kube-proxy" --config="$dir/kube-proxy.yaml" --hostname-override="$node" \
  >"$LOGS/$node-kube-proxy.log" 2>&1 &
children+=($!)
echo "${children[-1]}" > "$PIDS/$node-kube-proxy.pid"

log "$node: running (containerd, kubelet, kube-proxy)"
# Idle until told to stop (the TERM trap). A child that dies shows up as a NotReady
# node and in its log.
while true; do
  sleep 3600 &
  wait $! || true
done
