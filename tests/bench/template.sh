#!/usr/bin/env bash
# VM templates beside cold boots, measured INSIDE the nested-KVM testbed (scripts/bench.sh runs
# it) with husk-vmm and the agent driven directly (no containerd): COUNT VMs of MEM MiB, one
# vCPU, started one after another and left running idle together, first each booted cold, then
# each restored from one template (a booted VM whose agent answered, snapshotted). For each VM:
# the time from its VMM's start to its agent's answer (for a clone, and to its answer to
# Restored: its RNG reseeded, its clock set); for all COUNT at once, idle: the summed PSS of
# their VMMs (a clone's untouched pages are the template file's, in the page cache, shared
# between the clones; PSS counts a shared page once in all). Medians, sums and ratios; numbers
# only, never pass/fail.
# Usage: template.sh REPO [COUNT] [MEM_MIB]
set -uo pipefail
repo=$1 count=${2:-10} mem=${3:-128}
vmm=$repo/target/release/husk-vmm
husk=$repo/target/release/husk
kernel=${HUSK_CACHE:-/var/cache/husk}/current/vmlinux
initramfs=${HUSK_CACHE:-/var/cache/husk}/current/initramfs.cpio.gz
# shellcheck source-path=SCRIPTDIR source=../scripts/cri-env.sh
. "$repo/tests/scripts/cri-env.sh"
d=$(mktemp -d)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null; wait 2>/dev/null; rm -rf "$d"' EXIT
now() { date +%s%N; }
ms_since() { echo $((($(now) - $1) / 1000000)); }
agent() { "$husk" agent --addr "hvsock:$1" --timeout-secs 120 "${@:2}"; }

# median N...: the median of the numbers.
median() { printf '%s\n' "$@" | sort -n | awk '{v[NR] = $1} END {print (NR % 2) ? v[(NR + 1) / 2] : int((v[NR / 2] + v[NR / 2 + 1]) / 2)}'; }

# stop_all: ends every VM of this run (their sandboxes' destruction powers them off).
stop_all() {
    local i
    for i in "${!pids[@]}"; do
        agent "$d/v$i.sock" destroy-sandbox idle >/dev/null 2>&1 || kill "${pids[$i]}"
    done
    wait "${pids[@]}" 2>/dev/null
    pids=()
}

# settle: lets the guests go idle before their memory is read.
settle() { sleep 10; }

echo "VMs: $count at once, ${mem} MiB and 1 vCPU each, the agent driven directly (release builds)"
cold=()
for ((i = 0; i < count; i++)); do
    t=$(now)
    "$vmm" --kernel "$kernel" --initramfs "$initramfs" --mem-mib "$mem" --serial-log "$d/v$i.log" \
        --vsock-uds "$d/v$i.sock" >/dev/null 2>&1 &
    pids[i]=$!
    agent "$d/v$i.sock" --wait check >/dev/null || { echo "cold VM $i: no agent"; exit 1; }
    cold+=("$(ms_since "$t")")
    agent "$d/v$i.sock" create-sandbox idle >/dev/null
done
settle
cold_pss=$(pss_kib "${pids[@]}")
stop_all

"$vmm" --kernel "$kernel" --initramfs "$initramfs" --mem-mib "$mem" --serial-log "$d/t.log" \
    --vsock-uds "$d/t.sock" --api-sock "$d/t.api" >"$d/t.vmm.log" 2>&1 &
tpid=$!
t=$(now)
if ! { agent "$d/t.sock" --wait check >/dev/null && agent "$d/t.sock" prepare-template &&
    t=$(now) && "$husk" vmm --api "$d/t.api" snapshot "$d/template" >/dev/null; }; then
    echo "the template: no snapshot"
    tail -n 5 "$d/t.vmm.log"
    exit 1
fi
wait "$tpid"
echo "the template: $(ms_since "$t") ms to snapshot ($(grep -o 'paused in .*written in [0-9]* ms' "$d/t.vmm.log")); file $(($(du -k "$d/template" | cut -f1) / 1024)) MiB allocated of $((mem)) MiB"
clone=() answered=() restore=()
for ((i = 0; i < count; i++)); do
    t=$(now)
    "$vmm" --restore "$d/template" --mem-mib "$mem" --serial-log "$d/v$i.log" \
        --vsock-uds "$d/v$i.sock" >"$d/v$i.vmm.log" 2>&1 &
    pids[i]=$!
    agent "$d/v$i.sock" --wait check >/dev/null || { echo "clone $i: no agent"; exit 1; }
    clone+=("$(ms_since "$t")")
    agent "$d/v$i.sock" restored >/dev/null || { echo "clone $i: Restored failed"; exit 1; }
    answered+=("$(ms_since "$t")")
    restore+=("$(grep -o 'restored from the snapshot [0-9]*' "$d/v$i.vmm.log" | grep -o '[0-9]*$')")
    agent "$d/v$i.sock" create-sandbox idle >/dev/null
done
settle
clone_pss=$(pss_kib "${pids[@]}")
stop_all

mc=$(median "${cold[@]}") mt=$(median "${answered[@]}")
echo "cold boot to the agent's answer (ms): ${cold[*]}; median $mc"
echo "clone to the agent's answer (ms): ${clone[*]}; median $(median "${clone[@]}")"
echo "clone to Restored answered (ms): ${answered[*]}; median $mt"
echo "the restore alone, VMM start to the vCPUs' first run (ms): ${restore[*]}; median $(median "${restore[@]}")"
echo "ready: a clone in $(awk -v a="$mt" -v b="$mc" 'BEGIN {printf "%.2f", a / b}') of a cold boot's time"
echo "memory of $count idle VMs (summed PSS of their VMMs): cold $((cold_pss / 1024)) MiB, clones $((clone_pss / 1024)) MiB: $(awk -v a="$clone_pss" -v b="$cold_pss" 'BEGIN {printf "%.2f", a / b}') of cold"
