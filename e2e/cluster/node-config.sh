#!/usr/bin/env bash
# Writes one node's containerd, CNI, kubelet and kube-proxy configuration.
# usage: node-config.sh NODE NODE_PACKAGES_PREFIX
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
node=$1 packages=$2
dir="$TESTBED/$node"
mkdir -p "$dir/containerd/root" "$dir/containerd/state" "$dir/cni/net.d" "$dir/cni/networks" \
  "$dir/kubelet" "$dir/pod-logs"

cat > "$dir/containerd.toml" <<TOML
version = 3
imports = ['$dir/containerd/conf.d/*.toml']
root = '$dir/containerd/root'
state = '$dir/containerd/state'

[grpc]
  address = '$dir/containerd/containerd.sock'

[plugins.'io.containerd.cri.v1.images']
  snapshotter = 'overlayfs'
  [plugins.'io.containerd.cri.v1.images'.pinned_images]
    sandbox = 'registry.k8s.io/pause:3.10'

[plugins.'io.containerd.cri.v1.runtime']
  enable_cdi = false
  # The machine withholds CAP_SYS_RESOURCE, so no process may lower its OOM score
  # below containerd's own (the kubelet asks -998 for sandboxes).
  restrict_oom_score_adj = true
  [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
    runtime_type = 'io.containerd.runc.v2'
    [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
      BinaryName = '$(command -v runc)'
      SystemdCgroup = false
      Root = '$dir/runc'
  [plugins.'io.containerd.cri.v1.runtime'.cni]
    bin_dirs = ['$packages/root/usr/lib/cni']
    conf_dir = '$dir/cni/net.d'

[plugins.'io.containerd.grpc.v1.cri']
  stream_server_address = '127.0.0.1'
TOML

# cryopod's runtime handler, installed the way the agent DaemonSet does it.
CRYOPOD_HOST_ROOT=/ CRYOPOD_HANDLER_DIR="$dir/cryopod/bin" \
  CRYOPOD_CONTAINERD_DROPIN="$dir/containerd/conf.d/cryopod.toml" \
  CRYOPOD_RUNC="$(command -v runc)" CRYOPOD_RUNC_ROOT="$dir/runc" CRYOPOD_STATE_DIR="$dir/cryopod" \
  CRYOPOD_CRIU_DIR="$packages/bin" CRYOPOD_IPTABLES="$(command -v iptables)" CRYOPOD_NSENTER="$(command -v nsenter)" \
  RUST_LOG=warn "${CARGO_TARGET_DIR:-$REPO_ROOT/target}/debug/cryopod-node-agent" install-handler

cat > "$dir/cni/net.d/10-cryopod.conflist" <<JSON
{
  "cniVersion": "1.0.0",
  "name": "cryopod-testbed",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "cni0",
      "isGateway": true,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "dataDir": "$dir/cni/networks",
        "ranges": [[{"subnet": "$(pod_cidr "$node")"}]],
        "routes": [{"dst": "0.0.0.0/0"}]
      }
    },
    {"type": "portmap", "capabilities": {"portMappings": true}},
    {"type": "loopback"}
  ]
}
JSON

{
  kubelet_config "$node"
  cat <<YAML
containerRuntimeEndpoint: unix://$dir/containerd/containerd.sock
cgroupDriver: cgroupfs
failCgroupV1: false
cgroupRoot: $(cgroup_root "$node")
podLogsDir: $dir/pod-logs
YAML
} > "$dir/kubelet.yaml"

cat > "$dir/kube-proxy.yaml" <<YAML
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {kubeconfig: $PKI/kube-proxy.kubeconfig}
mode: iptables
clusterCIDR: $CLUSTER_CIDR
bindAddress: $(node_ip "$node")
healthzBindAddress: 127.0.0.1:10256
metricsBindAddress: 127.0.0.1:10249
# Leave the host-wide conntrack table size and timeouts alone.
conntrack: {maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}
YAML
