#!/usr/bin/env bash
# The soak, run INSIDE the nested-KVM testbed (scripts/soak.sh and tests/tests/soak.rs start
# it there): containerd with husk installed, then CYCLES cycles of INFLIGHT husk pods at once,
# each pod through runp -> create -> start -> exec -> logs -> stop -> rm -> stopp -> rmp with
# what a real pod has: its network (CNI bridge; the container pings the gateway), its image's
# layers, and a live volume (a host directory the container writes into and the host reads).
# After every cycle, an inventory of everything a pod could leave behind, against the one taken
# after a warm-up pod (which fills the layer cache): processes, mounts, files under /run/husk
# and /var/lib/husk, network namespaces, links, tc filters, cgroups, loop devices, CRI's pods
# and containers, containerd's fds and RSS; and the most fds a pod's shim held.
# A pod that fails is named with the step and crictl's error, then containerd's log lines about
# it (and its warnings and errors) while it lived, indented with "    | ".
# Numbers only, never pass/fail on time; the last line sums it up:
#   soak: C cycles, P pods (F failed) in S s: X pods/s; leaks at the end: L (...)
# Before the cycles, with BURST, a burst of BURST pods created at the same moment.
# Usage: soak.sh REPO HUSK_BINARY CYCLES INFLIGHT [BURST]
set -uo pipefail
repo=$1 husk=$2 cycles=$3 inflight=$4 burst=${5:-0}
# crictl's limit on one call: a kubelet's 2 minutes is for real hardware; here, 8 guests booting
# at once under the nested, emulated testbed took up to 100 s for a runp with the host's two
# cores busy elsewhere (the "slowest steps" line), and a boot that hangs is tried again after
# the shim's 90 s boot timeout.
CRI_TIMEOUT=300s
# shellcheck source-path=SCRIPTDIR source=cri-env.sh
. "$repo/tests/scripts/cri-env.sh"
now() { date +%s%N; }

CRI_TMPFS_SIZE=2g husk_cri_up "$husk" || exit 1
work=$(mktemp -d)
# A crictl call still waiting after 150 s is reported while it waits (stall: lines).
STALL_HUSK=$husk stall_watch 150

containerd_pid() { cat "$CRI_ROOT/containerd.pid"; }
containerd_mem() {
    local pid
    pid=$(containerd_pid)
    echo "containerd rss $(awk '/VmRSS/ {print $2}' "/proc/$pid/status") KiB, fds $(find "/proc/$pid/fd" -mindepth 1 | wc -l)"
}

# The warm-up pod: the layer cache and containerd's caches filled, the baseline taken after.
warm=$(pod_life soak-warm "$work/soak-warm")
echo "warm-up pod: $warm"
sed 's/^/    | /' "$CRI_ROOT/failures/soak-warm.log" 2>/dev/null
sleep 1
base=$(husk_inventory)
echo "baseline: $base"
echo "$(containerd_mem) (after the warm-up)"

declare -A leaked=()
maxfds=0
# cycle LABEL N: N pods through their lives at once, then the inventory, which may take 10 s
# to settle (a shim exiting after rmp is not a leak); prints the cycle's line, sets cycle_ok.
cycle() {
    local label=$1 n=$2 t k r fds i kv inv jobs=() leaks=()
    t=$(now)
    cycle_ok=0
    for ((k = 0; k < n; k++)); do
        pod_life "soak-$label-$k" "$work/soak-$label-$k" >"$work/result-$k" &
        jobs+=($!)
    done
    # (Not a bare wait: containerd is a job of this shell too.)
    wait "${jobs[@]}"
    for ((k = 0; k < n; k++)); do
        r=$(cat "$work/result-$k")
        if [[ $r == ok* ]]; then
            cycle_ok=$((cycle_ok + 1))
            fds=${r#ok }
            ((fds > maxfds)) && maxfds=$fds
        else
            echo "$label pod $k: $r"
            sed 's/^/    | /' "$CRI_ROOT/failures/soak-$label-$k.log" 2>/dev/null
        fi
    done
    for ((i = 0; i < 10; i++)); do
        inv=$(husk_inventory)
        [[ $inv == "$base" ]] && break
        sleep 1
    done
    mapfile -t leaks < <(inventory_diff "$base" "$inv")
    for kv in "${leaks[@]}"; do
        leaked[${kv%% *}]=1
    done
    echo "$label: $cycle_ok of $n pods ok in $((($(now) - t) / 1000000)) ms; leaks: ${#leaks[@]}${leaks[*]:+ (${leaks[*]})}; $(containerd_mem); L1 available $(awk '/^MemAvailable:/ {print int($2 / 1024)}' /proc/meminfo) MiB"
}

# Concurrency: BURST pods created at the same moment (slots, cache keys, sockets, drive
# images and taps must not collide).
if ((burst > 0)); then
    cycle burst "$burst"
    echo "burst: $cycle_ok of $burst pods created at once went through"
fi

pods=0 failed=0
t0=$(now)
for ((c = 1; c <= cycles; c++)); do
    cycle "cycle-$c" "$inflight"
    pods=$((pods + inflight))
    failed=$((failed + inflight - cycle_ok))
done
secs=$((($(now) - t0) / 1000000))
inv=$(husk_inventory)
mapfile -t leaks < <(inventory_diff "$base" "$inv")
echo "inventory at the end: $inv"
echo "counters that differed from the baseline after some cycle: ${#leaked[@]}${leaked[*]:+ (${!leaked[*]})}"
echo "most fds a shim held: $maxfds"
# Agent RPCs that ran past husk_client::RPC_DEADLINE on a guest that was alive, only slow.
slow=$(grep -ao 'slow agent RPC: [a-z_]* answered after [0-9.]*s' "$CRI_ROOT/containerd.log" |
    awk '{n++; s = $NF + 0; if (s > max) {max = s; rpc = $4}} END {printf "%d%s", n, n ? sprintf(" (the slowest: %s, %.1f s)", rpc, max) : ""}')
echo "agent RPCs answered only after a health check (a slow guest): $slow"
echo "boots that hung and were tried again: $(grep -c 'boot attempt [0-9]* hung' "$CRI_ROOT/containerd.log")"
# The slowest crictl call of each step, against crictl's --timeout (a kubelet's default runtime
# request timeout, 2 minutes).
echo "slowest steps (ms): $(awk '$2 > max[$1] {max[$1] = $2} END {for (s in max) printf "%s %d, ", s, max[s]}' \
    "$CRI_ROOT/steps.log" 2>/dev/null)crictl timeout $CRI_TIMEOUT"
echo "$(containerd_mem) (at the end)"
printf 'soak: %d cycles, %d pods (%d failed) in %d.%03d s: %s pods/s; leaks at the end: %d%s\n' \
    "$cycles" "$pods" "$failed" $((secs / 1000)) $((secs % 1000)) \
    "$(awk -v p="$pods" -v ms="$secs" 'BEGIN {printf "%.3f", p * 1000 / ms}')" \
    "${#leaks[@]}" "${leaks[*]:+ (${leaks[*]})}"
