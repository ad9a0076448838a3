#!/usr/bin/env bash
# `make cluster-down`: stops everything cluster-up started and removes what it
# created: processes (by recorded PID, process group, node cgroup and node mount
# namespace), cgroups, network namespaces and the testbed directory. Logs stay in
# $TESTBED/logs. Idempotent; safe after a failed or half-finished start.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
[[ -d $TESTBED ]] || exit 0

# stop_pid FILE: TERM the recorded process group, wait up to 30s, then KILL it.
stop_pid() {
  local file=$1 pid
  pid=$(cat "$file" 2>/dev/null) || return 0
  [[ $pid =~ ^[0-9]+$ ]] || return 0
  kill -0 "$pid" 2>/dev/null || return 0
  kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
  local deadline=$((SECONDS + 30))
  while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.2; done
  kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
}

# kill_node_leftovers NODE: processes in the node's cgroups or mount namespace.
kill_node_leftovers() {
  local node=$1 mntns pid
  for procs in $(find "/sys/fs/cgroup/pids$(cgroup_root "$node")" -name cgroup.procs 2>/dev/null); do
    for pid in $(cat "$procs" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null || true; done
  done
  mntns=$(cat "$PIDS/$node.mntns" 2>/dev/null) || return 0
  # Never the host's own mount namespace.
  [[ $mntns != "$(readlink /proc/1/ns/mnt)" && $mntns != "$(readlink /proc/self/ns/mnt)" ]] || return 0
  for p in /proc/[0-9]*; do
    [[ $(readlink "$p/ns/mnt" 2>/dev/null) == "$mntns" ]] && kill -KILL "${p#/proc/}" 2>/dev/null || true
  done
}

# Nodes first (they stop their containers), then the control plane and forwarders.
for node in "${NODES[@]}"; do stop_pid "$PIDS/$node.pid"; done
for node in "${NODES[@]}"; do kill_node_leftovers "$node"; done
for name in kube-scheduler kube-controller-manager s3 kube-apiserver etcd apiserver-forward s3-forward; do
  stop_pid "$PIDS/$name.pid"
done

# Our cgroups in every hierarchy (runc also mirrors them into the unified one),
# deepest first; a cgroup empties a moment after its last process dies.
for node in "${NODES[@]}"; do
  for hierarchy in /sys/fs/cgroup/*/; do
    root="${hierarchy%/}$(cgroup_root "$node")"
    [[ -d $root ]] || continue
    deadline=$((SECONDS + 20))
    until find "$root" -depth -type d -exec rmdir {} + 2>/dev/null; [[ ! -d $root ]]; do
      ((SECONDS < deadline)) || { log "cannot remove cgroup $root"; break; }
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
awk -v t="$TESTBED" 'index($5, t) == 1 {print $5}' /proc/self/mountinfo | sort -r | while read -r m; do
  umount -l "$m" || true
done

# node.sh made this mount point for its private tmpfs; an empty one goes.
rmdir /run/containerd 2>/dev/null || true
find "$TESTBED" -mindepth 1 -maxdepth 1 ! -name logs -exec rm -rf {} +
log "cluster down"
