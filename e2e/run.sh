#!/usr/bin/env bash
# `make e2e`: starts the local cluster, runs the end-to-end tests against it, stops it
# and checks that nothing is left. The cluster is stopped whatever happens, unless
# CRYOPOD_KEEP_CLUSTER=1 (for debugging).
source "$(dirname "${BASH_SOURCE[0]}")/cluster/env.sh"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

export CRYOPOD_TESTBED="$TESTBED"
export CRYOPOD_NODES="${NODES[*]}" CRYOPOD_VM_NODES="${VM_NODES[*]}"
export CRYOPOD_S3_ENDPOINT="http://$HOST_S3" CRYOPOD_S3_CLUSTER_ENDPOINT="http://$HUB_IP:$S3_PORT"
export CRYOPOD_S3_BUCKET="$S3_BUCKET"
export CRYOPOD_S3_ACCESS_KEY="$S3_ACCESS_KEY" CRYOPOD_S3_SECRET_KEY="$S3_SECRET_KEY"
CRYOPOD_NODE_PACKAGES=$("$HACK_DIR/ensure-node-packages.sh")
CRYOPOD_KUBE_BIN=$("$HACK_DIR/build-kubernetes.sh")
CRYOPOD_HELM=$("$HACK_DIR/ensure-helm.sh")
export CRYOPOD_NODE_PACKAGES CRYOPOD_KUBE_BIN CRYOPOD_HELM

# Compile before the cluster starts, so its start-up time is not spent building.
cargo test --locked -p cryopod-e2e --no-run --quiet
cargo build --locked -p cryopod-node-agent -p cryopod-operator -p kubectl-cryopod --bins --quiet
export CRYOPOD_AGENT_BIN="${CARGO_TARGET_DIR:-$REPO_ROOT/target}/debug/cryopod-node-agent"
export CRYOPOD_OPERATOR_BIN="${CARGO_TARGET_DIR:-$REPO_ROOT/target}/debug/cryopod-operator"
# The kubectl plugin; the tests put its directory first in PATH for kubectl to find it.
export CRYOPOD_PLUGIN_BIN="${CARGO_TARGET_DIR:-$REPO_ROOT/target}/debug/kubectl-cryopod"

down() {
  [[ ${CRYOPOD_KEEP_CLUSTER:-0} == 1 ]] && { log "keeping the cluster (CRYOPOD_KEEP_CLUSTER=1)"; return; }
  "$here/cluster/down.sh"
}
trap down EXIT
"$here/cluster/up.sh"

# Each run records its own outcomes for the matrices (compatibility, faults).
rm -rf "$LOGS/compat" "$LOGS/faults"
status=0
cargo test --locked --no-fail-fast -p cryopod-e2e --test cluster --test api --test agent --test agent_options --test restore --test security_capture --test security_restore --test operator --test workloads --test plugin --test schedule --test vm_node --test faults -- --test-threads=2 || status=$?
# An evacuation cordons a node of the shared cluster: alone, after the others.
cargo test --locked -p cryopod-e2e --test evacuation || status=$?
# The chart installed with Helm takes the whole cluster: alone, after the others.
cargo test --locked -p cryopod-e2e --test helm || status=$?

# The compatibility and fault matrices, from what the tests above recorded; with
# CRYOPOD_UPDATE_DOCS=1 they replace docs/compatibility.md and docs/reliability.md.
if cargo run --locked --quiet -p cryopod-e2e --bin matrices -- "$TESTBED" "$LOGS"; then
  log "matrices: $LOGS/compatibility.md, $LOGS/reliability.md"
  if [[ ${CRYOPOD_UPDATE_DOCS:-0} == 1 ]]; then
    cp "$LOGS/compatibility.md" "$LOGS/reliability.md" "$REPO_ROOT/docs/"
  fi
else
  status=1
fi

trap - EXIT
down
if [[ ${CRYOPOD_KEEP_CLUSTER:-0} != 1 ]]; then
  cargo test --locked -p cryopod-e2e --test leftovers || status=$?
fi
exit "$status"
