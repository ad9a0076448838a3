#!/usr/bin/env bash
# Makes the booted VM (hack/vm/boot.sh, started by up.sh) a node of the cluster: its
# routes, the cluster's certificates, the images, cryopod's runtime handler, then the
# kubelet (systemd cgroup driver, tainted VM_TAINT) and kube-proxy as systemd units.
# Everything travels through the VM's 9p share; the guest keeps its own paths
# (/run/containerd/containerd.sock, /var/lib/cryopod), which are the chart's defaults.
#
# usage: vm-node.sh NODE KUBE_BIN_DIR IMAGE_DIR STATIC_BIN_DIR
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
source "$HACK_DIR/vm/lib.sh"
node=$1 kube_bin=$2 images=$3 static=$4
run="$TESTBED/$node"
vm_attach "$run"
share="$run/share"
ip=$(node_ip "$node")

# Same-filesystem copies are links: nothing is written twice.
put() { mkdir -p "$2"; ln -f "$1" "$2/" 2>/dev/null || cp "$1" "$2/"; }
for bin in "$kube_bin/kubelet" "$kube_bin/kube-proxy" "$static/cryopod-node-agent" "$static/cryopod-runc"; do
  put "$bin" "$share/bin"
done
for image in "$images"/*.tar; do put "$image" "$share/images"; done
# The guest gets the testbed's PKI at the same path, so the kubeconfigs serve as they are.
for f in ca.crt "kubelet-$node.crt" "kubelet-$node.key" "kubelet-$node-serving.crt" "kubelet-$node-serving.key" \
  kube-proxy.crt kube-proxy.key "kubelet-$node.kubeconfig" kube-proxy.kubeconfig; do
  put "$PKI/$f" "$share/pki"
done
routes=""
for peer in "${ALL_NODES[@]}"; do
  [[ $peer == "$node" ]] || routes+="ip route replace $(pod_cidr "$peer") via $(node_ip "$peer"); "
done
taint_key=${VM_TAINT%%=*} taint_rest=${VM_TAINT#*=}
mkdir -p "$share/node"
{
  kubelet_config "$node"
  cat <<YAML
containerRuntimeEndpoint: unix:///run/containerd/containerd.sock
cgroupDriver: systemd
registerWithTaints: [{key: $taint_key, value: "${taint_rest%%:*}", effect: ${taint_rest#*:}}]
YAML
} > "$share/node/kubelet.yaml"

vm_exec -t 600 "set -eu
  $routes
  sysctl -qw net.ipv4.ip_forward=1 net.bridge.bridge-nf-call-iptables=1
  mkdir -p '$PKI' && cp /mnt/host/pki/* '$PKI/'
  install -m 0755 /mnt/host/bin/kubelet /mnt/host/bin/kube-proxy /usr/local/bin/
  for image in /mnt/host/images/*.tar; do ctr -n k8s.io images import \"\$image\" >/dev/null; done
  # The handler, with the guest's own runc, CRIU and state directory.
  mkdir -p /opt/cryopod/bin /var/lib/cryopod
  install -m 0755 /mnt/host/bin/cryopod-node-agent /mnt/host/bin/cryopod-runc /opt/cryopod/bin/
  CRYOPOD_HANDLER_DIR=/opt/cryopod/bin CRYOPOD_SYSTEMD_CGROUP=true CRYOPOD_RUNC=/usr/sbin/runc \\
    CRYOPOD_CRIU_DIR=/usr/sbin CRYOPOD_IPTABLES=/usr/sbin/iptables CRYOPOD_NSENTER=/usr/bin/nsenter \\
    RUST_LOG=warn /opt/cryopod/bin/cryopod-node-agent install-handler
  # containerd reads drop-ins at start.
  systemctl restart containerd
  for i in \$(seq 120); do ctr version >/dev/null 2>&1 && break; sleep 0.5; done
  [ -e /etc/resolv.conf ] || : > /etc/resolv.conf
  mkdir -p /etc/cni/net.d /etc/kubernetes /var/lib/cni/networks
  cat > /etc/cni/net.d/10-cryopod.conflist <<JSON
{\"cniVersion\": \"1.0.0\", \"name\": \"cryopod-testbed\", \"plugins\": [
  {\"type\": \"bridge\", \"bridge\": \"cni0\", \"isGateway\": true, \"ipMasq\": false, \"hairpinMode\": true,
   \"ipam\": {\"type\": \"host-local\", \"ranges\": [[{\"subnet\": \"$(pod_cidr "$node")\"}]], \"routes\": [{\"dst\": \"0.0.0.0/0\"}]}},
  {\"type\": \"portmap\", \"capabilities\": {\"portMappings\": true}},
  {\"type\": \"loopback\"}]}
JSON
  cp /mnt/host/node/kubelet.yaml /etc/kubernetes/kubelet.yaml
  cat > /etc/kubernetes/kube-proxy.yaml <<YAML
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {kubeconfig: $PKI/kube-proxy.kubeconfig}
mode: iptables
clusterCIDR: $CLUSTER_CIDR
bindAddress: $ip
healthzBindAddress: 127.0.0.1:10256
metricsBindAddress: 127.0.0.1:10249
YAML
  systemd-run --unit=kubelet --property=Restart=always /usr/local/bin/kubelet --config=/etc/kubernetes/kubelet.yaml \\
    --kubeconfig=$PKI/kubelet-$node.kubeconfig --hostname-override=$node --node-ip=$ip --v=1
  systemd-run --unit=kube-proxy --property=Restart=always /usr/local/bin/kube-proxy \\
    --config=/etc/kubernetes/kube-proxy.yaml --hostname-override=$node
  echo \"$node: kubelet and kube-proxy started\""
