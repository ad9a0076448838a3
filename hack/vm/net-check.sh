#!/usr/bin/env bash
# The VM on a tap, the way it will join the cluster's bridge: makes a network namespace
# of its own with a bridge (never the cluster's), boots the VM on a tap on that bridge,
# and checks both directions (ICMP and TCP). Removes the namespace, with the tap and the
# bridge, on exit.
# usage: net-check.sh [RUN_DIR]    (default /var/tmp/cryopod-vm-net)
source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"
source "$HACK_DIR/vm/lib.sh"
run=${1:-/var/tmp/cryopod-vm-net}
image=$("$HACK_DIR/vm/ensure-image.sh")
ns="cryopod-vmnet-$$"
VM_TAP_NETNS=$ns VM_TAP_BRIDGE=vmbr0 VM_GUEST_IP=10.201.0.10/24 VM_GUEST_GW=10.201.0.1
cleanup() {
  vm_stop
  ip netns del "$ns" 2>/dev/null || true
}
trap cleanup EXIT
trap 'exit 130' INT TERM
in_ns() { nsenter "--net=/run/netns/$ns" "$@"; }

ip netns add "$ns"
ip -n "$ns" link set lo up
ip -n "$ns" link add vmbr0 type bridge
ip -n "$ns" addr add 10.201.0.1/24 dev vmbr0
ip -n "$ns" link set vmbr0 up
vm_boot "$image" "$run"
vm_wait_ready 900
vm_exec 'ip -br addr show eth0; ip route; busybox ping -c 3 -W 5 10.201.0.1' || die "the guest cannot reach the bridge"
in_ns busybox ping -c 3 -W 5 10.201.0.10 >&2 || die "the bridge cannot reach the guest"
vm_exec 'systemd-run --unit=tcp-echo socat TCP-LISTEN:7777,reuseaddr,fork EXEC:cat' >/dev/null
sleep 3
reply=$(echo hello-vm | in_ns socat -t 5 - TCP:10.201.0.10:7777)
[[ $reply == hello-vm ]] || die "TCP through the tap: got '$reply'"
log "net: ICMP both ways and TCP from the bridge's namespace to the guest work"
