#!/usr/bin/env bash
# Run inside the nested-KVM testbed by tests/tests/microvm.rs: every check boots its own
# microVM with `husk run` (or husk-vmm directly) and prints its result between markers
#   === NAME
#   ...output...
#   === NAME rc=N
# Usage: microvm-checks.sh REPO ROOTFS NEVER_READY_INITRAMFS
set -uo pipefail
repo=$1 rootfs=$2 never_ready=$3
husk="$repo/target/debug/husk"
vmm="$repo/target/debug/husk-vmm"
export XDG_RUNTIME_DIR=/run/husk-test
mkdir -p "$XDG_RUNTIME_DIR"

check() {
    local name=$1
    shift
    echo "=== $name"
    "$@" 2>&1
    echo "=== $name rc=$?"
}

start=$(date +%s%N)
check hello "$husk" run --timings "$rootfs" -- sh -c 'echo hello from husk; exit 7'
echo "husk run wall time: $(( ($(date +%s%N) - start) / 1000000 )) ms"
check kernel "$husk" run "$rootfs" -- sh -c 'uname -r; cat /proc/sys/kernel/random/boot_id; cat /proc/self/cgroup'
echo "=== l1 boot_id"; cat /proc/sys/kernel/random/boot_id
check meminfo "$husk" run "$rootfs" -- sh -c 'grep -E "^(MemTotal|MemAvailable):" /proc/meminfo'
check ps "$husk" run "$rootfs" -- sh -c 'ps -o pid,comm'
check oom "$husk" run --memory 512 --container-memory 64 "$rootfs" -- dd if=/dev/zero of=/dev/null bs=200M count=1
check cpu "$husk" run --cpus 2 --container-cpus 0.5 "$rootfs" -- sh -c \
    'a=$(grep usage_usec /sys/fs/cgroup/cpu.stat | head -1 | cut -d" " -f2); t0=$(date +%s); while [ $(( $(date +%s) - t0 )) -lt 4 ]; do :; done; b=$(grep usage_usec /sys/fs/cgroup/cpu.stat | head -1 | cut -d" " -f2); echo "cpu_usec=$((b - a)) wall_sec=$(( $(date +%s) - t0 ))"; grep nr_throttled /sys/fs/cgroup/cpu.stat'
check stdin sh -c "printf 'one\ntwo\n' | '$husk' run -i '$rootfs' -- cat"
check never_ready "$husk" run --boot-timeout 20 --initramfs "$never_ready" "$rootfs" -- true
check missing_kernel "$husk" run --kernel /nonexistent/vmlinux "$rootfs" -- true
echo "=== leftovers"
pgrep -a husk-vmm
ls -A "$XDG_RUNTIME_DIR"
grep -c "$XDG_RUNTIME_DIR" /proc/mounts
echo "=== leftovers end"
