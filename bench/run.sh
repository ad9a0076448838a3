#!/usr/bin/env bash
# `make bench`: starts the local cluster, runs cryopod-bench against it (the figures and
# their baselines side by side), writes docs/performance.md and docs/performance.png,
# and stops the cluster whatever happens (unless CRYOPOD_KEEP_CLUSTER=1).
# Arguments go to cryopod-bench, e.g. `bench/run.sh --sizes 64,256 --repeats 1`.
source "$(dirname "${BASH_SOURCE[0]}")/../e2e/cluster/env.sh"

export CRYOPOD_TESTBED="$TESTBED" CRYOPOD_NODES="${NODES[*]}"
export CRYOPOD_S3_ENDPOINT="http://$HOST_S3" CRYOPOD_S3_CLUSTER_ENDPOINT="http://$HUB_IP:$S3_PORT"
export CRYOPOD_S3_BUCKET="$S3_BUCKET" CRYOPOD_S3_ACCESS_KEY="$S3_ACCESS_KEY" CRYOPOD_S3_SECRET_KEY="$S3_SECRET_KEY"
CRYOPOD_NODE_PACKAGES=$("$HACK_DIR/ensure-node-packages.sh")
CRYOPOD_KUBE_BIN=$("$HACK_DIR/build-kubernetes.sh")
CRYOPOD_HELM=$("$HACK_DIR/ensure-helm.sh")
export CRYOPOD_NODE_PACKAGES CRYOPOD_KUBE_BIN CRYOPOD_HELM

# Built like the images (static, profile `image`), sharing their compiled dependencies.
RUSTFLAGS="-C target-feature=+crt-static" cargo build --quiet --locked --profile image -p cryopod-bench -p cryopod-operator \
  --target x86_64-unknown-linux-gnu --manifest-path "$REPO_ROOT/Cargo.toml"
bench="${CARGO_TARGET_DIR:-$REPO_ROOT/target}/x86_64-unknown-linux-gnu/image/cryopod-bench"

down() {
  [[ ${CRYOPOD_KEEP_CLUSTER:-0} == 1 ]] && { log "keeping the cluster (CRYOPOD_KEEP_CLUSTER=1)"; return; }
  "$REPO_ROOT/e2e/cluster/down.sh"
}
trap down EXIT
"$REPO_ROOT/e2e/cluster/up.sh"
cd "$REPO_ROOT"
"$bench" --out docs "$@"
