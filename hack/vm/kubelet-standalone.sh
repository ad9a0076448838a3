#!/usr/bin/env bash
# A step towards joining the VM node: boots it, runs the project's kubelet
# (hack/build-kubernetes.sh) in standalone mode with the systemd cgroup driver and a
# static pod whose container runs as a non-root user, then keeps what containerd's CRI
# answered (the sandbox's and the container's specs, their cgroups) as fixtures for
# discovery, and checkpoints the non-root container with runc and CRIU, which this
# machine's own root cannot do (it lacks CAP_SYS_RESOURCE). Last, it freezes the pod on
# cgroup v2 in two ways and dumps it (RUN_DIR/freeze.txt): the scopes frozen one instant
# (must work), and the pod slice itself frozen (recorded; CRIU hangs there).
# usage: kubelet-standalone.sh [RUN_DIR]   (fixtures in RUN_DIR/share/fixtures)
source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"
source "$HACK_DIR/vm/lib.sh"
run=${1:-/var/tmp/cryopod-vm-kubelet}
image=$("$HACK_DIR/vm/ensure-image.sh")
kube_bin="$CRYOPOD_CACHE/kubernetes-$KUBERNETES_VERSION/bin"
[[ -x $kube_bin/kubelet ]] || kube_bin=$("$HACK_DIR/build-kubernetes.sh")
trap vm_stop EXIT
trap 'exit 130' INT TERM

vm_boot "$image" "$run"
cp "$kube_bin/kubelet" "$run/share/bin/kubelet"
vm_wait_ready 900

log "kubelet: images, CNI, configuration"
trap 'vm_stop; rm -f "$run/share/bin/kubelet"' EXIT
vm_exec 'set -eux
  install -m 0755 /mnt/host/bin/kubelet /usr/local/bin/kubelet
  d=/var/tmp/pause; mkdir -p $d; cp /usr/bin/catatonit $d/pause
  /mnt/host/bin/oci-image.sh k8s.io registry.k8s.io/pause:3.10 $d /pause -P
  d=/var/tmp/busybox; mkdir -p $d/bin $d/tmp; cp /usr/bin/busybox $d/bin/busybox
  for a in sh sleep echo cat id ls; do ln -sf busybox $d/bin/$a; done
  /mnt/host/bin/oci-image.sh k8s.io cryopod.local/busybox:vm $d /bin/sh
  mkdir -p /etc/cni/net.d /etc/kubernetes/manifests /var/lib/kubelet
  cat > /etc/cni/net.d/10-vm.conflist <<JSON
{"cniVersion": "1.0.0", "name": "cryopod-vm", "plugins": [
  {"type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": false,
   "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.244.3.0/24"}]], "routes": [{"dst": "0.0.0.0/0"}]}},
  {"type": "loopback"}]}
JSON
  cat > /etc/kubernetes/kubelet.yaml <<YAML
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
containerRuntimeEndpoint: unix:///run/containerd/containerd.sock
cgroupDriver: systemd
staticPodPath: /etc/kubernetes/manifests
address: 127.0.0.1
readOnlyPort: 0
authentication: {anonymous: {enabled: true}, webhook: {enabled: false}}
authorization: {mode: AlwaysAllow}
failSwapOn: false
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {memory.available: "1Mi", nodefs.available: "1%", nodefs.inodesFree: "1%", imagefs.available: "1%"}
YAML
  cat > /etc/kubernetes/manifests/counter.yaml <<YAML
apiVersion: v1
kind: Pod
metadata: {name: counter, namespace: default, uid: 0b7c5a4e-16a0-4f6e-9c2d-000000000016}
spec:
  securityContext: {runAsUser: 101, runAsGroup: 101, fsGroup: 101}
  containers:
  - name: counter
    image: cryopod.local/busybox:vm
    imagePullPolicy: Never
    command: [/bin/sh, -c, "i=0; while :; do i=\$((i+1)); echo \$i > /data/count; sleep 1; done"]
    volumeMounts: [{name: data, mountPath: /data}]
  volumes: [{name: data, emptyDir: {}}]
YAML
  systemd-run --unit=kubelet --property=Restart=no /usr/local/bin/kubelet \
    --config=/etc/kubernetes/kubelet.yaml --hostname-override=vm-node --v=1'
t0=$SECONDS
log "kubelet: waiting for the static pod's container"
vm_exec -t 600 'for i in $(seq 600); do
    [ "$(ctr -n k8s.io t ls | grep -c RUNNING)" -ge 2 ] && exit 0; sleep 1
  done; systemctl status kubelet --no-pager; journalctl -u kubelet --no-pager | tail -50; exit 1'
log "kubelet: the pod runs, $((SECONDS - t0)) s after the kubelet started"

vm_exec 'set -eu
  f=/mnt/host/fixtures; mkdir -p $f
  for id in $(ctr -n k8s.io c ls -q); do
    ctr -n k8s.io c info $id > $f/container-$id.json
    pid=$(ctr -n k8s.io t ls | awk -v id=$id "\$1 == id {print \$2}")
    kind=$(grep -q "\"io.kubernetes.cri.container-type\": \"sandbox\"" $f/container-$id.json && echo sandbox || echo container)
    echo "$kind $id pid $pid"
    echo "  cgroupsPath: $(grep -o "\"cgroupsPath\": \"[^\"]*\"" $f/container-$id.json)"
    echo "  /proc/$pid/cgroup: $(cat /proc/$pid/cgroup)"
    grep -E "^(Uid|Gid|CapEff)" /proc/$pid/status | sed "s/^/  /"
  done | tee $f/summary.txt
  ls -d /sys/fs/cgroup/kubepods.slice/*/*/ | tee $f/cgroup-dirs.txt'

log "checkpointing the non-root container with runc (CRIU)"
vm_exec 'set -eux
  id=$(for c in $(ctr -n k8s.io c ls -q); do
         ctr -n k8s.io c info $c | grep -q "\"io.kubernetes.cri.container-name\": \"counter\"" && echo $c; done; true)
  pid=$(ctr -n k8s.io t ls | awk -v id=$id "\$1 == id {print \$2}")
  cat /proc/$pid/root/data/count; stat -c "%U %u:%g %n" /proc/$pid/root/data/count
  rm -rf /var/tmp/ck; mkdir -p /var/tmp/ck
  t0=$(date +%s%N)
  runc --root /run/containerd/runc/k8s.io checkpoint --leave-running --image-path /var/tmp/ck $id
  t1=$(date +%s%N)
  echo "runc checkpoint --leave-running of the non-root container took $(( (t1 - t0) / 1000000 )) ms"
  ls /var/tmp/ck | head; du -sh /var/tmp/ck
  grep -c . /var/tmp/ck/*.img >/dev/null' | tee "$run/checkpoint.txt"
# How a pod is frozen at one instant on cgroup v2 and then dumped (platform.md has the
# v1 answers): with the pod's slice frozen, and with only the container's scope frozen
# (freeze the slice, then each scope, then thaw the slice).
log "freezing the pod on cgroup v2, then runc checkpoint"
vm_exec 'set -u
  id=$(for c in $(ctr -n k8s.io c ls -q); do
         ctr -n k8s.io c info $c | grep -q "\"io.kubernetes.cri.container-name\": \"counter\"" && echo $c; done; true)
  pid=$(ctr -n k8s.io t ls | awk -v id=$id "\$1 == id {print \$2}")
  pod=$(dirname "/sys/fs/cgroup$(cut -d: -f3 /proc/$pid/cgroup)")
  count() { cat /proc/$pid/root/data/count; }
  frozen() { grep -q "^frozen 1" $1/cgroup.events; }
  wait_frozen() { for i in $(seq 100); do frozen $1 && return 0; sleep 0.1; done; return 1; }
  ck() { rm -rf /var/tmp/ck2; mkdir -p /var/tmp/ck2
    t0=$(date +%s%N); timeout ${1:-120} runc --root /run/containerd/runc/k8s.io checkpoint --leave-running --image-path /var/tmp/ck2 $id > /var/tmp/ck2.out 2>&1; rc=$?; t1=$(date +%s%N)
    echo "runc checkpoint exit $rc after $(( (t1 - t0) / 1000000 )) ms"
    [ $rc = 0 ] || { tail -3 /var/tmp/ck2.out; grep -m3 Error /var/tmp/ck2/dump.log; tail -4 /var/tmp/ck2/dump.log; }; return $rc; }
  echo "pod slice: $pod"
  echo "== 1. one instant: freeze the slice, then every scope, then thaw the slice"
  echo 1 > $pod/cgroup.freeze; wait_frozen $pod
  for s in $pod/*.scope; do echo 1 > $s/cgroup.freeze; done
  echo 0 > $pod/cgroup.freeze
  a=$(count); sleep 2; b=$(count)
  echo "slice thawed, scopes frozen: $(for s in $pod/*.scope; do frozen $s && echo -n "frozen " || echo -n "running "; done); count $a then $b 2 s later"
  ck; r2=$?
  echo "after: scope frozen: $(frozen $pod/cri-containerd-$id.scope && echo yes || echo no)"
  for s in $pod/*.scope; do echo 0 > $s/cgroup.freeze; done
  sleep 2; echo "thawed: count $(count)"
  echo "== 2. the pod slice itself frozen (last: a failed dump may kill the container)"
  echo 1 > $pod/cgroup.freeze; wait_frozen $pod && echo "slice frozen at count $(count)"
  ck 30; r1=$?
  echo "after: slice frozen: $(frozen $pod && echo yes || echo no); scope events: $(tr "\n" " " < $pod/cri-containerd-$id.scope/cgroup.events)"
  echo 0 > $pod/cgroup.freeze; sleep 2
  echo "the container process after the thaw: $(kill -0 $pid 2>/dev/null && echo alive || echo gone)"
  echo "result: slice frozen -> exit $r1; scopes frozen -> exit $r2"
  [ $r2 = 0 ] && [ "$a" = "$b" ]' | tee "$run/freeze.txt"
log "fixtures in $run/share/fixtures"
