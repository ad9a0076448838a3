#!/usr/bin/env bash
# `make cluster-down`: stops everything cluster-up started and removes what it
# created: processes (by recorded PID, process group, node cgroup and node mount
# namespace), cgroups, network namespaces and the testbed directory. Logs stay in
# $TESTBED/logs. Idempotent; safe after a failed or half-finished start.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
[[ -d $TESTBED ]] || exit 0

# stop_pid NAME: TERM the recorded process group, wait up to 30s, then KILL it. A
# recycled PID (its start time differs from the recorded one) is left alone; a group
# whose leader died is still stopped.
stop_pid() {
  local name=$1 pid
  pid=$(cat "$PIDS/$name.pid" 2>/dev/null) || return 0
  [[ $pid =~ ^[0-9]+$ ]] || return 0
  if kill -0 "$pid" 2>/dev/null && [[ $(start_time "$pid") != "$(cat "$PIDS/$name.start" 2>/dev/null)" ]]; then
    log "PID $pid of $name belongs to another process now; leaving it"
    return 0
  fi
  kill -0 -- "-$pid" 2>/dev/null || return 0
  kill -TERM -- "-$pid" 2>/dev/null || true
  local deadline=$((SECONDS + 30))
  while kill -0 -- "-$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.2; done
  kill -KILL -- "-$pid" 2>/dev/null || true
}

# thaw_node NODE: frozen tasks ignore SIGKILL, so thaw every cgroup of the node first.
thaw_node() {
  local root=/sys/fs/cgroup/freezer$(cgroup_root "$1") f
  [[ -d $root ]] && find "$root" -name freezer.state | while read -r f; do echo THAWED > "$f" 2>/dev/null || true; done
  root=/sys/fs/cgroup/unified$(cgroup_root "$1")
  [[ -d $root ]] && find "$root" -name cgroup.freeze | while read -r f; do echo 0 > "$f" 2>/dev/null || true; done
  return 0
}

# kill_node_leftovers NODE: processes in the node's cgroups, or in its mount
# namespace while up.sh's bind mount pins it (so its inode cannot be another's).
kill_node_leftovers() {
  local node=$1 ref="$PIDS/$1.mnt-ref" mntns pid
  thaw_node "$node"
  for procs in $(find "/sys/fs/cgroup/pids$(cgroup_root "$node")" -name cgroup.procs 2>/dev/null); do
    for pid in $(cat "$procs" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null || true; done
  done
  mountpoint -q "$ref" || return 0
  mntns="mnt:[$(stat -L -c %i "$ref")]"
  # Never the host's own mount namespace.
  [[ $mntns != "$(readlink /proc/1/ns/mnt)" && $mntns != "$(readlink /proc/self/ns/mnt)" ]] || return 0
  for p in /proc/[0-9]*; do
    [[ $(readlink "$p/ns/mnt" 2>/dev/null) == "$mntns" ]] && kill -KILL "${p#/proc/}" 2>/dev/null || true
  done
}

# Nodes first (they stop their containers), then the control plane and forwarders.
# A VM node is its QEMU: boot.sh stops it and removes its disk; its tap goes with the hub.
for node in "${VM_NODES[@]}"; do stop_pid "$node"; done
for node in "${NODES[@]}"; do thaw_node "$node"; stop_pid "$node"; done
for node in "${NODES[@]}"; do kill_node_leftovers "$node"; done
for name in kube-scheduler kube-controller-manager s3 kube-apiserver etcd apiserver-forward s3-forward; do
  stop_pid "$name"
done

failed=0
# Our cgroups in every hierarchy (runc also mirrors them into the unified one),
# deepest first; a cgroup empties a moment after its last process dies.
for node in "${NODES[@]}"; do
  for hierarchy in /sys/fs/cgroup/*/; do
    root="${hierarchy%/}$(cgroup_root "$node")"
    [[ -d $root ]] || continue
    deadline=$((SECONDS + 20))
    until find "$root" -depth -type d -exec rmdir {} + 2>/dev/null; [[ ! -d $root ]]; do
      ((SECONDS < deadline)) || { log "cannot remove cgroup $root"; failed=1; break; }
      kill_node_leftovers "$node"
      sleep 0.2
    done
  done
done

for ns in "${NODES[@]/#/cryopod-}" "$HUB_NS"; do
  [[ -e /run/netns/$ns ]] && ip netns delete "$ns"
done

# Mounts should have died with the node mount namespaces; anything left under the
# testbed (from an interrupted start) is unmounted, deepest first.
for node in "${NODES[@]}"; do
  mountpoint -q "$PIDS/$node.mnt-ref" && umount "$PIDS/$node.mnt-ref"
done
awk -v t="$TESTBED" '$5 == t || index($5, t "/") == 1 {print $5}' /proc/self/mountinfo | sort -r | while read -r m; do
  umount -l "$m" || true
done

# node.sh made these mount points for its private mounts; empty ones go.
rmdir /run/containerd /run/nri /var/lib/cryopod 2>/dev/null || true
find "$TESTBED" -mindepth 1 -maxdepth 1 ! -name logs -exec rm -rf {} +
((failed == 0)) || die "some cgroups could not be removed; see above"
log "cluster down"
