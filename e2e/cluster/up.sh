#!/usr/bin/env bash
# `make cluster-up`: a real two-node Kubernetes cluster on this machine. Idempotent: a
# healthy cluster is left as it is; anything else is torn down and started again.
#
#   hub netns (cryopod-hub): bridge cryopod0 10.200.0.1, etcd, kube-apiserver,
#     kube-controller-manager, kube-scheduler, the S3 server
#   node netns (cryopod-node-N) + own mount ns: 10.200.0.1N, containerd, kubelet,
#     kube-proxy, CNI bridge for pods 10.244.N.0/24
#   VM node (node-3, hack/vm/): QEMU in the hub on a tap on cryopod0, 10.200.0.13, its
#     own kernel, systemd, cgroup v2, containerd with the systemd cgroup driver, pods
#     10.244.3.0/24; tainted VM_TAINT (CRYOPOD_VM_NODE=0 leaves it out)
#   host: only loopback forwarders 127.0.0.1:6443 and :7070 into the hub
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
started=$SECONDS

# What every run needs, built or fetched once into the cache.
packages=$("$HACK_DIR/ensure-node-packages.sh")
kube_bin=$("$HACK_DIR/build-kubernetes.sh")
s3_server=$("$HACK_DIR/ensure-s3.sh")
kubectl=(env KUBECONFIG="$KUBECONFIG_ADMIN" "$kube_bin/kubectl")

# all_nodes_ready: every node of the testbed has registered and is Ready.
all_nodes_ready() {
  [[ -f $KUBECONFIG_ADMIN ]] || return 1
  local ready
  ready=$("${kubectl[@]}" get nodes --request-timeout=5s \
    -o jsonpath='{range .items[*]}{.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}' 2>/dev/null | grep -c True) || return 1
  ((ready == ${#ALL_NODES[@]}))
}
healthy() {
  all_nodes_ready && curl -s "http://$HOST_S3/" -o /dev/null --max-time 5
}
if healthy; then
  log "cluster is already up"
  echo "KUBECONFIG=$KUBECONFIG_ADMIN"
  exit 0
fi
"$here/down.sh"

mkdir -p "$PIDS" "$LOGS" "$TESTBED/images"
# A failed start leaves nothing half-running.
trap 'status=$?; if ((status)); then log "cluster-up failed; logs in $LOGS"; "$here/down.sh" --keep-logs; fi' EXIT
"$here/pki.sh"

# Bridged pod traffic must pass the node's iptables (kube-proxy); built in on most
# kernels, a module on others.
modprobe br_netfilter 2>/dev/null || true
# Several kubelets and containerds need more inotify instances than the default 128.
(( $(sysctl -n fs.inotify.max_user_instances) >= 1024 )) || sysctl -qw fs.inotify.max_user_instances=1024

# spawn NAME CMD...: starts CMD detached, logging to $LOGS/NAME.log; records its PID
# and its start time, so teardown never signals a recycled PID.
spawn() {
  local name=$1; shift
  setsid bash -c 'echo $$ > "$0"; exec "$@"' "$PIDS/$name.pid" "$@" >"$LOGS/$name.log" 2>&1 </dev/null &
  local deadline=$((SECONDS + 10))
  until [[ -s $PIDS/$name.pid ]]; do ((SECONDS < deadline)) || die "$name did not start"; sleep 0.1; done
  start_time "$(cat "$PIDS/$name.pid")" > "$PIDS/$name.start"
}
in_hub=(nsenter "--net=/run/netns/$HUB_NS")

# wait_for WHAT SECONDS CMD...: polls CMD until it succeeds or the deadline passes.
wait_for() {
  local what=$1 limit=$2; shift 2
  local deadline=$((SECONDS + limit))
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || die "$what not ready after ${limit}s; logs in $LOGS"
    sleep 0.5
  done
}

log "network: hub $HUB_NS, nodes ${NODES[*]}"
ip netns add "$HUB_NS"
"${in_hub[@]}" ip link set lo up
"${in_hub[@]}" ip link add "$HUB_BRIDGE" type bridge
"${in_hub[@]}" ip addr add "$HUB_IP/24" dev "$HUB_BRIDGE"
"${in_hub[@]}" ip link set "$HUB_BRIDGE" up
for node in "${NODES[@]}"; do
  ns=$(node_ns "$node") idx=$(node_idx "$node")
  ip netns add "$ns"
  # Both ends are created inside the hub, then one moves into the node.
  "${in_hub[@]}" ip link add "veth-n$idx" type veth peer name eth0
  "${in_hub[@]}" ip link set eth0 netns "$ns"
  "${in_hub[@]}" ip link set "veth-n$idx" master "$HUB_BRIDGE" up
  ip -n "$ns" link set lo up
  ip -n "$ns" addr add "$(node_ip "$node")/24" dev eth0
  ip -n "$ns" link set eth0 up
  ip -n "$ns" route add default via "$HUB_IP"
  for peer in "${ALL_NODES[@]}"; do
    [[ $peer == "$node" ]] || ip -n "$ns" route add "$(pod_cidr "$peer")" via "$(node_ip "$peer")"
  done
  # The control plane answers pods (the kubernetes Service leads there) through their node.
  "${in_hub[@]}" ip route add "$(pod_cidr "$node")" via "$(node_ip "$node")"
done

# The VM boots (about a minute under TCG) while the rest starts; QEMU runs in the hub,
# on a tap on the hub's bridge, and goes with boot.sh at teardown.
for node in "${VM_NODES[@]}"; do
  "${in_hub[@]}" ip route add "$(pod_cidr "$node")" via "$(node_ip "$node")"
  spawn "$node" env VM_TAP_NETNS="$HUB_NS" VM_TAP_BRIDGE="$HUB_BRIDGE" VM_TAP="tap-n$(node_idx "$node")" \
    VM_GUEST_IP="$(node_ip "$node")/24" VM_GUEST_GW="$HUB_IP" VM_MAC="52:54:00:c0:70:1$(node_idx "$node")" \
    "$HACK_DIR/vm/boot.sh" "$TESTBED/$node"
done

log "cgroups: a root of our own per node in every v1 controller"
for node in "${NODES[@]}"; do
  for c in "${CGROUP_CONTROLLERS[@]}"; do
    [[ -d /sys/fs/cgroup/$c ]] || continue
    mkdir -p "/sys/fs/cgroup/$c$(cgroup_root "$node")"
  done
  # A new cpuset has no CPUs or memory nodes until given its parent's.
  cs="/sys/fs/cgroup/cpuset$(cgroup_root "$node")"
  cat /sys/fs/cgroup/cpuset/cpuset.cpus > "$cs/cpuset.cpus"
  cat /sys/fs/cgroup/cpuset/cpuset.mems > "$cs/cpuset.mems"
done

log "control plane"
spawn etcd "${in_hub[@]}" "$packages/bin/etcd" --name testbed --data-dir "$TESTBED/etcd" \
  --listen-client-urls http://127.0.0.1:2379 --advertise-client-urls http://127.0.0.1:2379 \
  --listen-peer-urls http://127.0.0.1:2380 --initial-advertise-peer-urls http://127.0.0.1:2380 \
  --initial-cluster testbed=http://127.0.0.1:2380 --unsafe-no-fsync --log-level warn
spawn kube-apiserver "${in_hub[@]}" "$kube_bin/kube-apiserver" \
  --etcd-servers=http://127.0.0.1:2379 --bind-address="$HUB_IP" --advertise-address="$HUB_IP" \
  --secure-port="$APISERVER_PORT" --service-cluster-ip-range="$SERVICE_CIDR" \
  --tls-cert-file="$PKI/apiserver.crt" --tls-private-key-file="$PKI/apiserver.key" --client-ca-file="$PKI/ca.crt" \
  --kubelet-client-certificate="$PKI/apiserver-kubelet-client.crt" --kubelet-client-key="$PKI/apiserver-kubelet-client.key" \
  --kubelet-certificate-authority="$PKI/ca.crt" --kubelet-preferred-address-types=InternalIP \
  --service-account-issuer=https://kubernetes.default.svc.cluster.local --service-account-key-file="$PKI/sa.pub" \
  --service-account-signing-key-file="$PKI/sa.key" --authorization-mode=Node,RBAC \
  --enable-admission-plugins=NodeRestriction --allow-privileged=true --profiling=false
spawn apiserver-forward socat "TCP-LISTEN:$APISERVER_PORT,bind=127.0.0.1,reuseaddr,fork" \
  "SYSTEM:exec nsenter --net=/run/netns/$HUB_NS socat STDIO TCP\:$HUB_IP\:$APISERVER_PORT"
wait_for kube-apiserver 120 "${kubectl[@]}" get --raw /readyz
spawn kube-controller-manager "${in_hub[@]}" "$kube_bin/kube-controller-manager" \
  --kubeconfig="$PKI/controller-manager.kubeconfig" --authentication-kubeconfig="$PKI/controller-manager.kubeconfig" \
  --authorization-kubeconfig="$PKI/controller-manager.kubeconfig" --bind-address=127.0.0.1 \
  --service-account-private-key-file="$PKI/sa.key" --root-ca-file="$PKI/ca.crt" \
  --use-service-account-credentials=true --allocate-node-cidrs=false --leader-elect=false \
  --cluster-signing-cert-file="$PKI/ca.crt" --cluster-signing-key-file="$PKI/ca.key" --profiling=false
spawn kube-scheduler "${in_hub[@]}" "$kube_bin/kube-scheduler" --kubeconfig="$PKI/scheduler.kubeconfig" \
  --authentication-kubeconfig="$PKI/scheduler.kubeconfig" --authorization-kubeconfig="$PKI/scheduler.kubeconfig" \
  --bind-address=127.0.0.1 --leader-elect=false --profiling=false

log "S3 server"
mkdir -p "$TESTBED/s3/$S3_BUCKET"
spawn s3 "${in_hub[@]}" "$s3_server" --host "$HUB_IP" --port "$S3_PORT" \
  --access-key "$S3_ACCESS_KEY" --secret-key "$S3_SECRET_KEY" "$TESTBED/s3"
spawn s3-forward socat "TCP-LISTEN:$S3_PORT,bind=127.0.0.1,reuseaddr,fork" \
  "SYSTEM:exec nsenter --net=/run/netns/$HUB_NS socat STDIO TCP\:$HUB_IP\:$S3_PORT"

log "images"
"$here/images.sh" "$TESTBED/images"
# The agent binary installs cryopod's runtime handler on each node (node-config.sh).
cargo build --quiet --locked -p cryopod-node-agent --bins --manifest-path "$REPO_ROOT/Cargo.toml"

log "nodes"
for node in "${NODES[@]}"; do
  "$here/node-config.sh" "$node" "$packages"
  spawn "$node" unshare --mount --propagation private \
    nsenter "--net=/run/netns/$(node_ns "$node")" "$here/node.sh" "$node" "$kube_bin" "$packages" "$TESTBED/images"
  # Pin the node's mount namespace with a bind mount: teardown recognises the node's
  # leftover processes by it, and a pinned namespace's inode is never reused.
  wait_for "$node's mount namespace" 30 test -s "$PIDS/$node.mntns"
  touch "$PIDS/$node.mnt-ref"
  mount --bind "/proc/$(cat "$PIDS/$node.pid")/ns/mnt" "$PIDS/$node.mnt-ref"
done
for node in "${VM_NODES[@]}"; do
  wait_for "$node (the VM) to boot" 900 test -s "$TESTBED/$node/ready"
  "$here/vm-node.sh" "$node" "$kube_bin" "$TESTBED/images" \
    "${CARGO_TARGET_DIR:-$REPO_ROOT/target}/x86_64-unknown-linux-gnu/image"
done
wait_for "all ${#ALL_NODES[@]} nodes Ready" 300 all_nodes_ready
wait_for "default service account" 60 "${kubectl[@]}" get serviceaccount default -n default
# The RuntimeClass of restored pods; every node has the handler (node-config.sh).
"${kubectl[@]}" apply -f - >/dev/null <<YAML
apiVersion: node.k8s.io/v1
kind: RuntimeClass
metadata: {name: cryopod}
handler: cryopod
YAML
wait_for "S3 server" 30 curl -s "http://$HOST_S3/" -o /dev/null --max-time 2

trap - EXIT
log "cluster up in $((SECONDS - started))s"
echo "KUBECONFIG=$KUBECONFIG_ADMIN"
