# Shared settings of the local cluster. Sourced by the other scripts.
# shellcheck source=../../hack/lib.sh
source "$(cd "$(dirname "${BASH_SOURCE[0]}")/../../hack" && pwd)/lib.sh"

# Everything the cluster writes lives here; `make cluster-down` removes it (logs stay).
TESTBED="${CRYOPOD_TESTBED:-/var/tmp/cryopod-testbed}"
PIDS="$TESTBED/pids"
LOGS="$TESTBED/logs"
PKI="$TESTBED/pki"
KUBECONFIG_ADMIN="$TESTBED/admin.kubeconfig"

NODES=(node-1 node-2)
# The VM node (#16): its own kernel, systemd, pure cgroup v2 and the systemd cgroup
# driver (hack/vm/). CRYOPOD_VM_NODE=0 leaves it out (a cluster of the two netns nodes).
if [[ ${CRYOPOD_VM_NODE:-1} == 0 ]]; then VM_NODES=(); else VM_NODES=(node-3); fi
ALL_NODES=("${NODES[@]}" "${VM_NODES[@]}")
# Pods land there only when they ask: everything on it runs about 20 times slower (TCG).
VM_TAINT=cryopod.io/vm-node=true:NoSchedule
HUB_NS=cryopod-hub            # holds the bridge, the control plane and the S3 server
HUB_BRIDGE=cryopod0
HUB_IP=10.200.0.1
node_ns()   { echo "cryopod-$1"; }
node_idx()  { echo "${1#node-}"; }
node_ip()   { echo "10.200.0.$((10 + $(node_idx "$1")))"; }
pod_cidr()  { echo "10.244.$(node_idx "$1").0/24"; }
CLUSTER_CIDR=10.244.0.0/16
SERVICE_CIDR=10.96.0.0/16
KUBERNETES_SERVICE_IP=10.96.0.1
APISERVER_PORT=6443
S3_PORT=7070
S3_BUCKET=cryopod
S3_ACCESS_KEY=cryopod
S3_SECRET_KEY=cryopod-secret-key
# The control plane and S3 are reached from the host through loopback forwarders.
HOST_APISERVER="127.0.0.1:$APISERVER_PORT"
HOST_S3="127.0.0.1:$S3_PORT"
# A cgroup of our own in every v1 controller per node; never the machine's.
cgroup_root() { echo "/cryopod-$1"; }
CGROUP_CONTROLLERS=(blkio cpu cpuacct cpuset devices freezer memory pids systemd)

# start_time PID: the process's start time in clock ticks since boot (field 22 of
# /proc/PID/stat, counted after the parenthesised command name).
start_time() { sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f20; }

# kubelet_config NODE: the kubelet settings every node shares; the caller adds its
# runtime endpoint, cgroup driver and paths.
kubelet_config() {
  local node=$1
  cat <<YAML
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $(node_ip "$node")
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
tlsCertFile: $PKI/kubelet-$node-serving.crt
tlsPrivateKeyFile: $PKI/kubelet-$node-serving.key
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $PKI/ca.crt}
authorization: {mode: Webhook}
clusterDomain: cluster.local
resolvConf: /etc/resolv.conf
failSwapOn: false
maxPods: 50
# Imported images cannot be pulled again: never garbage-collect them, never evict.
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {memory.available: "1Mi", nodefs.available: "1%", nodefs.inodesFree: "1%", imagefs.available: "1%"}
serializeImagePulls: false
localStorageCapacityIsolation: false
YAML
}
