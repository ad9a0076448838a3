#!/usr/bin/env bash
# `make demo`: the local cluster, cryopod installed with Helm, and a live migration of
# a two-container app whose state lives in memory, from node-1 to node-2.
#
# The app: `counter` counts in a shell variable (memory only) and publishes each
# number in the pod's shared memory (/dev/shm); `reporter`, another container, reads
# it from there and logs it. Restarted instead of restored, the counter would begin
# again at 1 and the reporter would find nothing. The cluster stays up afterwards
# (`make cluster-down` stops it).
source "$(dirname "${BASH_SOURCE[0]}")/cluster/env.sh"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
helm_bin=$("$HACK_DIR/ensure-helm.sh")
kube_bin=$("$HACK_DIR/build-kubernetes.sh")
packages=$("$HACK_DIR/ensure-node-packages.sh")
export KUBECONFIG="$KUBECONFIG_ADMIN"
kubectl() { "$kube_bin/kubectl" "$@"; }
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "the local cluster (2 nodes, containerd, runc, CRIU, an S3 server) and the images"
"$here/cluster/up.sh"

step "helm install cryopod"
# The RuntimeClass cluster-up made for the tests belongs to the release here.
kubectl delete runtimeclass cryopod --ignore-not-found >/dev/null
"$helm_bin" upgrade --install cryopod "$REPO_ROOT/charts/cryopod" --namespace cryopod-system --create-namespace \
  --set image.operator.pullPolicy=Never --set image.agent.pullPolicy=Never \
  --set agent.criuDir="$packages/bin" --wait --timeout 3m
kubectl get pods -n cryopod-system -o wide

step "object storage: the S3 server, as the default CheckpointStorage"
kubectl apply -f - <<YAML
apiVersion: v1
kind: Namespace
metadata: {name: demo}
---
apiVersion: v1
kind: Secret
metadata: {name: s3-credentials, namespace: demo}
stringData: {accessKeyId: $S3_ACCESS_KEY, secretAccessKey: $S3_SECRET_KEY}
---
apiVersion: cryopod.io/v1alpha1
kind: CheckpointStorage
metadata:
  name: demo-s3
  annotations: {cryopod.io/default-storage: "true"}
spec:
  type: S3
  prefix: demo
  s3:
    endpoint: http://$HUB_IP:$S3_PORT
    bucket: $S3_BUCKET
    forcePathStyle: true
    credentialsSecretRef: {name: s3-credentials, namespace: demo}
YAML

step "the app: two containers sharing a counter that lives in memory, on node-1"
kubectl delete podmigration move-app -n demo --ignore-not-found >/dev/null
kubectl apply -f - <<YAML
apiVersion: v1
kind: Pod
metadata: {name: app, namespace: demo}
spec:
  nodeName: ${NODES[0]}
  terminationGracePeriodSeconds: 1
  containers:
    - name: counter
      image: cryopod.local/busybox:e2e
      imagePullPolicy: Never
      command: [sh, -c, 'i=0; while :; do i=\$((i+1)); echo \$i > /dev/shm/count; sleep 0.2; done']
    - name: reporter
      image: cryopod.local/busybox:e2e
      imagePullPolicy: Never
      command: [sh, -c, 'while :; do echo "the counter is at \$(cat /dev/shm/count 2>/dev/null)"; sleep 1; done']
YAML
kubectl wait -n demo --for=condition=Ready pod/app --timeout=90s
sleep 5 # let it count for a while, for the show
kubectl logs -n demo app -c reporter --tail=3
before=$(kubectl logs -n demo app -c reporter --tail=1 | awk '{print $NF}')

step "kubectl apply a PodMigration to ${NODES[1]}"
kubectl apply -f - <<YAML
apiVersion: cryopod.io/v1alpha1
kind: PodMigration
metadata: {name: move-app, namespace: demo}
spec:
  sourcePodName: app
  target: {nodeName: ${NODES[1]}}
YAML
kubectl wait -n demo --for=condition=Ready podmigration/move-app --timeout=180s
kubectl get podmigration -n demo move-app
target=$(kubectl get podmigration -n demo move-app -o jsonpath='{.status.targetPodName}')
downtime=$(kubectl get podmigration -n demo move-app -o jsonpath='{.status.downtimeMillis}')
checkpoint=$(kubectl get podmigration -n demo move-app -o jsonpath='{.status.checkpointName}')
freeze=$(kubectl get podcheckpoint -n demo "$checkpoint" -o jsonpath='{.status.timings.freezeWindowMillis}')

step "the app runs on ${NODES[1]} as $target, carrying on"
kubectl get pods -n demo -o wide
kubectl wait -n demo --for=condition=Ready "pod/$target" --timeout=60s
sleep 3
kubectl logs -n demo "$target" -c reporter --tail=3
after=$(kubectl logs -n demo "$target" -c reporter --tail=1 | awk '{print $NF}')
echo
echo "counter before the move: $before; after it: $after (a restart would count from 1)"
echo "freeze window: ${freeze} ms; downtime (frozen on ${NODES[0]} to Ready on ${NODES[1]}): ${downtime} ms"
[[ $after =~ ^[0-9]+$ && $before =~ ^[0-9]+$ ]] && ((after > before)) \
  || die "the counter did not carry on ($before -> $after)"
echo
echo "The cluster is still up: export KUBECONFIG=$KUBECONFIG_ADMIN; 'make cluster-down' stops it."
