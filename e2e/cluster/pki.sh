#!/usr/bin/env bash
# Generates the cluster's CA, serving and client certificates and kubeconfigs with
# openssl, once per testbed.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"

mkdir -p "$PKI"
cd "$PKI"
[[ -f ca.crt ]] || openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=cryopod-testbed-ca" \
  -keyout ca.key -out ca.crt 2>/dev/null

# cert NAME SUBJECT [SANS]: a key and a certificate signed by the CA.
cert() {
  local name=$1 subject=$2 sans=${3:-}
  [[ -f $name.crt ]] && return 0
  openssl req -newkey rsa:2048 -nodes -subj "$subject" -keyout "$name.key" -out "$name.csr" 2>/dev/null
  local ext="extendedKeyUsage=serverAuth,clientAuth"
  [[ -n $sans ]] && ext+=$'\n'"subjectAltName=$sans"
  openssl x509 -req -in "$name.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 \
    -extfile <(printf '%s\n' "$ext") -out "$name.crt" 2>/dev/null
  rm -f "$name.csr"
}

# kubeconfig NAME SERVER: a kubeconfig using NAME's client certificate.
kubeconfig() {
  local name=$1 server=$2 out="$PKI/$1.kubeconfig"
  cat > "$out" <<KC
apiVersion: v1
kind: Config
clusters:
- name: cryopod-testbed
  cluster:
    server: https://$server
    certificate-authority: $PKI/ca.crt
users:
- name: $name
  user:
    client-certificate: $PKI/$name.crt
    client-key: $PKI/$name.key
contexts:
- name: cryopod-testbed
  context: {cluster: cryopod-testbed, user: $name}
current-context: cryopod-testbed
KC
}

cert apiserver "/CN=kube-apiserver" \
  "IP:$HUB_IP,IP:127.0.0.1,IP:$KUBERNETES_SERVICE_IP,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local,DNS:localhost"
cert apiserver-kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client"
cert admin "/O=system:masters/CN=cryopod-admin"
cert controller-manager "/CN=system:kube-controller-manager"
cert scheduler "/CN=system:kube-scheduler"
cert kube-proxy "/CN=system:kube-proxy"
[[ -f sa.key ]] || { openssl genrsa -out sa.key 2048 2>/dev/null && openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null; }

kubeconfig admin "$HOST_APISERVER"
kubeconfig controller-manager "$HUB_IP:$APISERVER_PORT"
kubeconfig scheduler "$HUB_IP:$APISERVER_PORT"
kubeconfig kube-proxy "$HUB_IP:$APISERVER_PORT"
for node in "${ALL_NODES[@]}"; do
  cert "kubelet-$node" "/O=system:nodes/CN=system:node:$node"
  cert "kubelet-$node-serving" "/CN=$node" "IP:$(node_ip "$node"),DNS:$node"
  kubeconfig "kubelet-$node" "$HUB_IP:$APISERVER_PORT"
done
cp admin.kubeconfig "$KUBECONFIG_ADMIN"
