#!/usr/bin/env bash
# Boots the VM node (hack/vm/ensure-image.sh builds and caches its image), waits until
# systemd has finished booting, then runs until SIGINT or SIGTERM, when it stops QEMU and
# removes the run's disk. RUN_DIR/ready appears once the guest has booted (it holds the
# seconds from QEMU's start). Its serial console, QEMU's log and the command channel's share
# stay in RUN_DIR.
# usage: boot.sh [RUN_DIR]    (default /var/tmp/cryopod-vm)
source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"
source "$HACK_DIR/vm/lib.sh"
run=${1:-/var/tmp/cryopod-vm}
image=$("$HACK_DIR/vm/ensure-image.sh")
trap vm_stop EXIT
trap 'exit 130' INT TERM
vm_boot "$image" "$run"
vm_wait_ready
# Whoever waits for the guest (e2e/cluster/up.sh) waits for this file.
echo "$VM_READY" > "$run/ready"
log "vm: running; commands: source hack/lib.sh and hack/vm/lib.sh, then vm_attach $run and vm_exec"
while kill -0 "$VM_PID" 2>/dev/null; do sleep 1; done
die "vm: QEMU exited; see $run/serial.log"
