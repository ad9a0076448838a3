#!/usr/bin/env bash
# Boots the VM node and checks, inside it, what the node needs (issue #16): systemd as
# PID 1, a pure cgroup v2 hierarchy, containerd 2.x with runc under the systemd cgroup
# driver, CRIU (and its lazy-pages support), every capability for root, and a container
# run by containerd that is checkpointed and restored. It also measures the boot, the
# guest's memory, and how much slower the guest runs than the host (a shell loop, a CRIU
# dump of a small process). Each check's output goes to RUN_DIR/report.txt; the
# figures to RUN_DIR/figures.txt. Exits non-zero if a check fails.
# usage: check.sh [RUN_DIR]    (default /var/tmp/cryopod-vm-check)
source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"
source "$HACK_DIR/vm/lib.sh"
run=${1:-/var/tmp/cryopod-vm-check}
image=$("$HACK_DIR/vm/ensure-image.sh")
host_criu="$("$HACK_DIR/ensure-node-packages.sh")/bin/criu"

host_pids=()
cleanup() {
  local pid
  for pid in "${host_pids[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
  vm_stop
}
trap cleanup EXIT
trap 'exit 130' INT TERM

vm_boot "$image" "$run"
vm_wait_ready 900
report="$run/report.txt" figures="$run/figures.txt"
: > "$report"
{
  echo "accelerator: $(vm_accel "$image" 2>/dev/null)"
  echo "guest: $VM_CPUS vCPUs, $VM_MEMORY_MB MiB; $(awk '$1 == "kernel"' "$image/manifest.txt")"
  echo "boot: agent up ${VM_AGENT_UP} s, systemd finished ${VM_READY} s after QEMU started (host clock)"
} > "$figures"
rm -f "$run/failed"

# check NAME SCRIPT: runs SCRIPT in the guest; a non-zero status fails the check.
check() {
  local name=$1 script=$2 out rc=0
  out=$(vm_exec "$script" 2>&1) || rc=$?
  { echo "=== $name (exit $rc)"; echo "$out"; } >> "$report"
  # Checks often run in pipelines (subshells): failures are counted in a file.
  if ((rc == 0)); then log "check: $name: ok"; else log "check: $name: FAILED (exit $rc)"; echo "$name" >> "$run/failed"; fi
  printf '%s\n' "$out"
  return 0
}

check "systemd is PID 1" '[ "$(cat /proc/1/comm)" = systemd ] && readlink /proc/1/exe && systemctl --version | head -1' >/dev/null
check "boot time" 'systemd-analyze time; systemd-analyze critical-chain multi-user.target | head -20; systemd-analyze blame | head -15' |
  sed -n 's/^Startup finished in /systemd: /p' >> "$figures"
check "pure cgroup v2" '
  [ "$(stat -fc %T /sys/fs/cgroup)" = cgroup2fs ] || exit 1
  grep cgroup /proc/mounts
  [ -z "$(awk '"'"'$3 == "cgroup"'"'"' /proc/mounts)" ] || exit 1    # no v1 hierarchy mounted anywhere
  echo "controllers: $(cat /sys/fs/cgroup/cgroup.controllers)"
  for c in cpuset cpu io memory pids; do grep -qw $c /sys/fs/cgroup/cgroup.controllers || exit 1; done
  echo "freeze: $(ls /sys/fs/cgroup/system.slice/cgroup.freeze)"' | sed -n '/controllers/p' >> "$figures"
check "root holds every capability (CAP_SYS_RESOURCE included)" '
  grep Cap /proc/self/status; capsh --decode=$(awk "/CapEff/ {print \$2}" /proc/self/status)
  eff=$(awk "/CapEff/ {print \$2}" /proc/self/status)
  [ $(( (0x$eff >> 24) & 1 )) = 1 ]' >/dev/null
check "versions" 'containerd --version; runc --version; criu --version; ctr version; uname -r' >> "$figures"
check "containerd runs runc with SystemdCgroup = true" '
  systemctl is-active containerd
  containerd config dump | grep -E "SystemdCgroup|runtime_type|sandbox ="
  containerd config dump | grep -q "SystemdCgroup = true"' >/dev/null
check "criu check" 'criu check && criu check --all; true' >/dev/null
check "criu features" '
  for f in uffd uffd-noncoop mem_dirty_track network_lock_nftables; do
    if criu check --feature $f >/dev/null 2>&1; then echo "criu feature $f: yes"; else echo "criu feature $f: no"; fi
  done
  criu check --feature uffd-noncoop' >> "$figures"
check "memory after boot" 'free -m; grep -E "MemTotal|MemAvailable" /proc/meminfo' |
  awk '/MemTotal/ {t=$2} /MemAvailable/ {a=$2} END {printf "guest memory used after boot (MemTotal - MemAvailable): %d MiB\n", (t - a) / 1024}' >> "$figures"

# A busybox image built inside the guest as an OCI archive (hack/vm/share/oci-image.sh), a counter container under the systemd cgroup driver, then a checkpoint
# and a restore through containerd (runc and CRIU underneath).
check "a container under the systemd driver, checkpointed and restored" '
  set -eux
  d=/var/tmp/busybox; rm -rf $d; mkdir -p $d/bin $d/tmp
  cp /usr/bin/busybox $d/bin/busybox
  for a in sh sleep echo cat; do ln -s busybox $d/bin/$a; done
  /mnt/host/bin/oci-image.sh default cryopod.local/busybox:vm $d /bin/sh
  ctr run -d --runc-systemd-cgroup --cgroup system.slice:cryopod:c1 cryopod.local/busybox:vm c1 \
    sh -c "i=0; while :; do i=\$((i+1)); echo \$i > /tmp/count; sleep 1; done"
  sleep 3
  ctr c info c1 | grep -i cgroupsPath
  pid=$(ctr t ls | awk "\$1 == \"c1\" {print \$2}")
  echo "cgroup of the container process: $(cat /proc/$pid/cgroup)"
  ctr t exec --exec-id e1 c1 cat /tmp/count
  at=$(ctr t exec --exec-id e0 c1 cat /tmp/count)
  t0=$(date +%s%N)
  ctr c checkpoint --task --rw c1 cryopod.local/checkpoint/c1:1
  t1=$(date +%s%N)
  echo "checkpoint (ctr c checkpoint --task --rw) took $(( (t1 - t0) / 1000000 )) ms"
  # (the checkpoint leaves c1 running: --task without --exit)
  ctr t kill -s KILL c1; sleep 1; ctr t rm c1 || true; ctr c rm c1
  t0=$(date +%s%N)
  ctr c restore --rw --live c1 cryopod.local/checkpoint/c1:1
  t1=$(date +%s%N)
  echo "restore (ctr c restore --rw --live) took $(( (t1 - t0) / 1000000 )) ms"
  sleep 3
  after=$(ctr t exec --exec-id e3 c1 cat /tmp/count)
  echo "count just before the checkpoint: $at, 3 s after the restore: $after (a fresh start would show 3 or 4)"
  [ "$after" -gt "$at" ] && [ "$after" -gt 5 ] && [ "$after" -lt $((at + 20)) ]
  pid=$(ctr t ls | awk "\$1 == \"c1\" {print \$2}")
  echo "cgroup of the restored process: $(cat /proc/$pid/cgroup)"
  ctr t kill -s KILL c1; sleep 1; ctr t rm c1 || true; ctr c rm c1' | sed -nE '/^(checkpoint|restore|count just|cgroup of)/p' >> "$figures"

# Host vs guest: a shell loop, and CRIU dumping and restoring one small process.
loop='i=0; while ((i < 200000)); do ((i++)); done'
criu_script='set -e
  d=$(mktemp -d); setsid sleep 1000 </dev/null >/dev/null 2>&1 & pid=$!
  sleep 0.5
  t0=$(date +%s%N); $CRIU dump -t $pid -D $d >/dev/null 2>&1 || { cat $d/*.log 2>/dev/null; exit 1; }; t1=$(date +%s%N)
  $CRIU restore -D $d -d >/dev/null 2>&1; t2=$(date +%s%N)
  kill -KILL $pid; rm -rf $d
  echo "$(( (t1 - t0) / 1000000 )) $(( (t2 - t1) / 1000000 ))"'
ms() { local t0 t1; t0=$(date +%s%N); "$@" >/dev/null; t1=$(date +%s%N); echo $(( (t1 - t0) / 1000000 )); }
host_loop=$(ms bash -c "$loop")
guest_loop=$(check "shell loop" 't0=$(date +%s%N); bash -c '"'$loop'"'; t1=$(date +%s%N); echo $(( (t1 - t0) / 1000000 ))')
read -r host_dump host_restore < <(CRIU=$host_criu bash -c "$criu_script" 2>/dev/null | tail -1)
read -r guest_dump guest_restore < <(check "criu dump and restore of a small process" "CRIU=criu; $criu_script" | tail -1)
{
  echo "shell loop (200000 iterations of bash arithmetic): host $host_loop ms, guest $guest_loop ms, $(awk -v h="$host_loop" -v g="$guest_loop" 'BEGIN {printf "%.1fx", g / h}')"
  echo "criu dump of a sleeping process: host $host_dump ms, guest $guest_dump ms, $(awk -v h="$host_dump" -v g="$guest_dump" 'BEGIN {printf "%.1fx", g / h}')"
  echo "criu restore -d of it: host $host_restore ms, guest $guest_restore ms, $(awk -v h="$host_restore" -v g="$guest_restore" 'BEGIN {printf "%.1fx", g / h}')"
  echo "guest memory used at the end: $(vm_exec 'awk "/MemTotal/ {t=\$2} /MemAvailable/ {a=\$2} END {print int((t - a) / 1024)}" /proc/meminfo') MiB; QEMU resident on the host: $(awk '/VmRSS/ {print int($2 / 1024)}' "/proc/$VM_PID/status") MiB"
  echo "run disk (overlay) after the checks: $(du -m "$run/disk.qcow2" | cut -f1) MiB; image: $(du -sm "$image" | cut -f1) MiB"
} >> "$figures"
# The guest's kernel must have stayed healthy through all of it.
if grep -E "Oops|Kernel panic|BUG:|WARNING:" "$run/serial.log"; then
  log "check: the guest kernel reported a problem (above; $run/serial.log)"; echo "guest kernel" >> "$run/failed"
fi
cat "$figures"
[[ ! -s $run/failed ]] || die "failed checks: $(paste -sd, "$run/failed") (see $report)"
log "every check passed; report in $report"
