# The VM node's helpers: boot the image of hack/vm/ensure-image.sh under QEMU, run
# commands in it, stop it. Source it (after hack/lib.sh); it keeps its state in VM_*.
#
#   vm_boot IMAGE_DIR RUN_DIR   start QEMU in the background (KVM if it boots here, else TCG)
#   vm_wait_ready [SECONDS]     wait for the guest's agent, then for systemd to finish booting
#   vm_exec [-t SECONDS] [SCRIPT]   run SCRIPT (or stdin) as root in the guest through the
#                               9p command channel; prints its output, returns its status
#   vm_stop                     stop QEMU (by the PID this shell started) and remove the run's disk
#   vm_attach RUN_DIR           use vm_exec on a VM that another process (boot.sh) runs
#
# The guest's disk is a qcow2 overlay in RUN_DIR on top of the cached image, so every boot
# starts from the same state. The serial console goes to RUN_DIR/serial.log.
# The network: by default QEMU's user mode with restrict=on (the guest reaches nothing
# outside itself). With VM_TAP_NETNS and VM_TAP_BRIDGE set, QEMU runs inside that network
# namespace (which the caller made) on a tap it creates there and puts on that bridge;
# the guest's eth0 gets VM_GUEST_IP (ADDR/PREFIX) and the default route VM_GUEST_GW.
VM_MEMORY_MB=${CRYOPOD_VM_MEMORY_MB:-2048}
VM_CPUS=${CRYOPOD_VM_CPUS:-2}
# TCG's multi-threaded mode (one host thread per vCPU) crashed the guest kernel here once:
# "Oops: int3" in __schedule, at a site the kernel had just live-patched (text_poke with
# int3), while the other vCPU ran it. One thread for both vCPUs is the safe default.
VM_TCG_THREAD=${CRYOPOD_VM_TCG_THREAD:-single}
# TCG's translation cache (QEMU's default is 1 GiB, most of QEMU's resident memory).
VM_TCG_TB_MB=${CRYOPOD_VM_TCG_TB_MB:-256}
# cgroup v2 only (systemd >= 258 knows no other), serial console, predictable eth0.
VM_CMDLINE="root=/dev/vda rw console=ttyS0,115200 systemd.unified_cgroup_hierarchy=1 net.ifnames=0 panic=-1"
VM_TAP_NETNS=${VM_TAP_NETNS:-} VM_TAP_BRIDGE=${VM_TAP_BRIDGE:-} VM_TAP=${VM_TAP:-vmtap0}
VM_GUEST_IP=${VM_GUEST_IP:-} VM_GUEST_GW=${VM_GUEST_GW:-}
VM_MAC=${VM_MAC:-52:54:00:c0:70:10}
VM_PID=
VM_RUN=
VM_SEQ=0

# vm_accel IMAGE_DIR: prints the QEMU accelerator arguments that boot a kernel on this
# machine: KVM if a guest under KVM gets through the kernel's start within a deadline,
# otherwise TCG. The answer is kept per host boot ($CRYOPOD_CACHE/vm-accel/<boot id>);
# CRYOPOD_VM_ACCEL=kvm|tcg skips the probe.
vm_accel() {
  local image=$1 cache="$CRYOPOD_CACHE/vm-accel/$(cat /proc/sys/kernel/random/boot_id)"
  local choice=${CRYOPOD_VM_ACCEL:-}
  if [[ -z $choice && -s $cache ]]; then choice=$(cat "$cache"); fi
  if [[ -z $choice ]]; then
    choice=tcg
    if [[ -r /dev/kvm && -w /dev/kvm ]]; then
      local cpu
      for cpu in host host,arch-capabilities=off; do
        if vm_probe_kvm "$image" "$cpu"; then choice="kvm:$cpu"; break; fi
      done
    else
      log "vm: /dev/kvm is not usable"
    fi
    mkdir -p "${cache%/*}" && echo "$choice" > "$cache"
  fi
  log "vm: accelerator ${choice} (probed once per host boot: $cache)"
  case $choice in
    kvm) echo "-accel kvm -cpu host" ;;
    kvm:*) echo "-accel kvm -cpu ${choice#kvm:}" ;;
    tcg) echo "-accel tcg,thread=$VM_TCG_THREAD,tb-size=$VM_TCG_TB_MB -cpu max" ;;
    *) die "unknown accelerator '$choice'" ;;
  esac
}

# vm_probe_kvm IMAGE_DIR CPU: boots the kernel under KVM with no root filesystem; true if
# it reaches the end of its own start ("Freeing unused kernel image") within 20 s.
vm_probe_kvm() {
  local image=$1 cpu=$2 log pid deadline=$((SECONDS + 20)) ok=1
  log=$(mktemp /tmp/cryopod-vm-probe.XXXXXX)
  qemu-system-x86_64 -accel kvm -cpu "$cpu" -machine q35 -m 512 -smp 1 -nodefaults -no-reboot \
    -display none -serial "file:$log" -kernel "$image/vmlinuz" \
    -append "console=ttyS0 earlyprintk=serial,ttyS0,115200 panic=-1 rdinit=/nonexistent" >>"$log.err" 2>&1 &
  pid=$!
  while ((SECONDS < deadline)) && kill -0 "$pid" 2>/dev/null; do
    if grep -q "Freeing unused kernel image" "$log"; then ok=0; break; fi
    sleep 0.5
  done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  if ((ok == 0)); then
    log "vm: KVM boots a kernel here (-cpu $cpu)"
  else
    log "vm: KVM with -cpu $cpu did not boot a kernel within 20 s; serial: $(head -c 300 "$log" | tr -c '[:print:]' ' ') qemu: $(head -c 300 "$log.err" | tr '\n' ' ')"
  fi
  rm -f "$log" "$log.err"
  return "$ok"
}

vm_boot() {
  local image=$1 run=$2 accel
  command -v qemu-system-x86_64 >/dev/null || die "qemu-system-x86_64 is missing (hack/vm/ensure-image.sh installs it)"
  [[ -z $VM_PID ]] || die "a VM is already running (pid $VM_PID)"
  accel=$(vm_accel "$image")
  VM_RUN=$run
  # A run directory is reused only if it holds an earlier run (never wipe anything else).
  if [[ -e $run ]]; then
    [[ -d $run/share && ! -e $run/qemu.pid ]] || [[ -z $(ls -A "$run") ]] ||
      die "vm: $run is not an earlier run's directory (or its QEMU still runs): not reusing it"
    rm -rf "$run"
  fi
  mkdir -p "$run/share/req" "$run/share/res" "$run/share/bin"
  # Guest-side tools, at /mnt/host/bin in the guest.
  cp "$HACK_DIR/vm/share/"* "$run/share/bin/"
  qemu-img create -q -f qcow2 -F qcow2 -b "$image/rootfs.qcow2" "$run/disk.qcow2"
  local netns=() nic=(-nic "user,restrict=on,model=virtio-net-pci,mac=$VM_MAC") cmdline=$VM_CMDLINE
  if [[ -n $VM_TAP_NETNS ]]; then
    [[ -n $VM_TAP_BRIDGE && -n $VM_GUEST_IP ]] || die "vm: a tap needs VM_TAP_BRIDGE and VM_GUEST_IP"
    ip -n "$VM_TAP_NETNS" tuntap add dev "$VM_TAP" mode tap
    ip -n "$VM_TAP_NETNS" link set "$VM_TAP" master "$VM_TAP_BRIDGE" up
    netns=(nsenter "--net=/run/netns/$VM_TAP_NETNS")
    nic=(-netdev "tap,id=net0,ifname=$VM_TAP,script=no,downscript=no" -device "virtio-net-pci,netdev=net0,mac=$VM_MAC")
    cmdline+=" cryopod.ip=$VM_GUEST_IP${VM_GUEST_GW:+ cryopod.gw=$VM_GUEST_GW}"
  fi
  VM_BOOT_START=$(date +%s.%N)
  # shellcheck disable=SC2086 # accel is a list of arguments
  "${netns[@]}" qemu-system-x86_64 $accel -machine q35 -smp "$VM_CPUS" -m "$VM_MEMORY_MB" -nodefaults -no-reboot \
    -display none -serial "file:$run/serial.log" \
    -kernel "$image/vmlinuz" -initrd "$image/initrd.img" -append "$cmdline ${CRYOPOD_VM_CMDLINE_EXTRA:-}" \
    -drive "file=$run/disk.qcow2,if=virtio,format=qcow2,cache=unsafe" \
    -virtfs "local,path=$run/share,mount_tag=cryopod,security_model=none,id=share" \
    "${nic[@]}" \
    -device virtio-rng-pci \
    >"$run/qemu.log" 2>&1 &
  VM_PID=$!
  echo "$VM_PID" > "$run/qemu.pid"
  log "vm: QEMU pid $VM_PID ($accel, $VM_CPUS vCPUs, $VM_MEMORY_MB MiB), serial console $run/serial.log"
}

# vm_wait_ready [SECONDS]: the agent answers, then systemd has finished starting units.
# Sets VM_AGENT_UP and VM_READY (host seconds since QEMU started).
vm_elapsed() { awk -v s="$VM_BOOT_START" -v n="$(date +%s.%N)" 'BEGIN {printf "%.1f", n - s}'; }

vm_wait_ready() {
  local timeout=${1:-600} deadline
  deadline=$((SECONDS + timeout))
  until [[ -s $VM_RUN/share/res/agent-up ]]; do
    kill -0 "$VM_PID" 2>/dev/null || die "vm: QEMU exited; see $VM_RUN/qemu.log and $VM_RUN/serial.log"
    ((SECONDS < deadline)) || die "vm: no agent within ${timeout} s; see $VM_RUN/serial.log"
    sleep 0.5
  done
  VM_AGENT_UP=$(vm_elapsed)
  log "vm: agent up after ${VM_AGENT_UP} s"
  vm_exec -t $((deadline - SECONDS)) 'systemctl is-system-running --wait' >/dev/null ||
    log "vm: systemd reports a degraded system: $(vm_exec 'systemctl --failed --no-legend')"
  VM_READY=$(vm_elapsed)
  log "vm: systemd finished booting after ${VM_READY} s"
}

vm_exec() {
  local timeout=600 id script req res deadline
  if [[ ${1:-} == -t ]]; then timeout=$2; shift 2; fi
  if (($#)); then script=$*; else script=$(cat); fi
  [[ -n $VM_PID ]] || die "vm_exec: no VM"
  # Unique even when called from subshells (pipelines), which share $$ and VM_SEQ.
  id="$(date +%s%N)-$BASHPID-$((++VM_SEQ))"
  req="$VM_RUN/share/req" res="$VM_RUN/share/res"
  printf '%s\n' "$script" > "$req/.$id.tmp" && mv "$req/.$id.tmp" "$req/$id.sh"
  deadline=$((SECONDS + timeout))
  until [[ -s $res/$id.rc ]]; do
    kill -0 "$VM_PID" 2>/dev/null || die "vm: QEMU exited during '$script'; see $VM_RUN/serial.log"
    ((SECONDS < deadline)) || { log "vm: '$script' timed out after $timeout s"; cat "$res/$id.out" 2>/dev/null; return 124; }
    sleep 0.2
  done
  cat "$res/$id.out"
  return "$(cat "$res/$id.rc")"
}

vm_attach() {
  VM_RUN=$1
  VM_PID=$(cat "$VM_RUN/qemu.pid" 2>/dev/null) || die "vm: no VM runs in $VM_RUN"
  [[ $(readlink "/proc/$VM_PID/exe" 2>/dev/null) == */qemu-system-x86_64 ]] || die "vm: pid $VM_PID of $VM_RUN is not QEMU"
}

vm_stop() {
  [[ -n $VM_PID ]] || return 0
  log "vm: stopping QEMU pid $VM_PID"
  kill -TERM "$VM_PID" 2>/dev/null || true
  local i
  for i in $(seq 50); do kill -0 "$VM_PID" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$VM_PID" 2>/dev/null || true
  wait "$VM_PID" 2>/dev/null || true
  VM_PID=
  rm -f "$VM_RUN/disk.qcow2" "$VM_RUN/qemu.pid"
  if [[ -n $VM_TAP_NETNS ]]; then ip -n "$VM_TAP_NETNS" link del "$VM_TAP" 2>/dev/null || true; fi
}
