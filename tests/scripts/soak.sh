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
# Numbers only, never pass/fail on time; the last line sums it up:
#   soak: C cycles, P pods (F failed) in S s: X pods/s; leaks at the end: L (...)
# Usage: soak.sh REPO HUSK_BINARY CYCLES INFLIGHT
set -uo pipefail
repo=$1 husk=$2 cycles=$3 inflight=$4
# shellcheck source-path=SCRIPTDIR source=cri-env.sh
. "$repo/tests/scripts/cri-env.sh"
now() { date +%s%N; }

if ! { CRI_TMPFS_SIZE=2g cri_config &&
    "$husk" install --config "$CRI_ROOT/config.toml" --bin-dir /usr/local/bin >/dev/null &&
    cri_launch; }; then
    echo "soak: containerd did not come up"
    tail -n 30 "$CRI_ROOT/containerd.log"
    exit 1
fi
trap cri_stop EXIT
work=$(mktemp -d)

# inventory: NAME=VALUE pairs of what must come back to its warm level after every cycle.
inventory() {
    local filters=0 dev
    for dev in /sys/class/net/*; do
        filters=$((filters + $(tc filter show dev "${dev##*/}" ingress 2>/dev/null | grep -c filter)))
    done
    echo "vmm=$(pgrep -c husk-vmm) shim=$(pgrep -c -f containerd-shim-husk) virtiofsd=$(pgrep -c -x virtiofsd)" \
        "mounts=$(wc -l </proc/self/mountinfo) run_files=$(find /run/husk 2>/dev/null | wc -l)" \
        "state_files=$(find /var/lib/husk 2>/dev/null | wc -l) netns=$(find /run/netns -mindepth 1 2>/dev/null | wc -l)" \
        "links=$(ip -o link show | wc -l) tc_filters=$filters cgroups=$(find /sys/fs/cgroup -type d | wc -l)" \
        "loops=$(losetup -a | wc -l) pods=$("${CRICTL[@]}" pods -q | wc -l) containers=$("${CRICTL[@]}" ps -aq | wc -l)"
}
containerd_pid() { cat "$CRI_ROOT/containerd.pid"; }
containerd_mem() {
    local pid
    pid=$(containerd_pid)
    echo "containerd rss $(awk '/VmRSS/ {print $2}' "/proc/$pid/status") KiB, fds $(find "/proc/$pid/fd" -mindepth 1 | wc -l)"
}

# pod_cycle NAME: one pod's whole life; prints "ok FDS" or "failed at STEP", and leaves
# nothing of the pod behind either way.
pod_cycle() {
    local name=$1 d=$work/$1 pod='' ctr='' shim fds=0 i
    # The result goes to fd 3, this function's stdout, also from inside $(...).
    exec 3>&1
    mkdir -p "$d/vol"
    pod_json "$d/pod.json" "$name" true
    cat >"$d/c.json" <<EOF
{"metadata": {"name": "$name"}, "image": {"image": "docker.io/husk/busybox:1"},
 "command": ["sh", "-c", "echo $name > /vol/out && echo started && exec sleep 1000"],
 "mounts": [{"container_path": "/vol", "host_path": "$d/vol"}],
 "log_path": "$name.log", "linux": {}}
EOF
    fail() {
        echo "failed at $1" >&3
        [[ -n $ctr ]] && "${CRICTL[@]}" rm -f "$ctr" >/dev/null 2>&1
        if [[ -n $pod ]]; then
            "${CRICTL[@]}" stopp "$pod" >/dev/null 2>&1
            "${CRICTL[@]}" rmp -f "$pod" >/dev/null 2>&1
        fi
        rm -rf "$d"
    }
    # cri STEP ARGS...: crictl ARGS, its output echoed; on failure the pod is cleaned up, the
    # step and crictl's last error line printed, and 1 returned.
    cri() {
        local step=$1
        shift
        "${CRICTL[@]}" "$@" 2>"$d/err" || { fail "$step: $(tail -n 1 "$d/err")"; return 1; }
    }
    pod=$(cri runp runp "$d/pod.json") || return
    ctr=$(cri create create "$pod" "$d/c.json" "$d/pod.json") || return
    cri start start "$ctr" >/dev/null || return
    for ((i = 0; i < 300; i++)); do
        "${CRICTL[@]}" logs "$ctr" 2>/dev/null | grep -q started && break
        sleep 0.1
    done
    if ! "${CRICTL[@]}" logs "$ctr" 2>/dev/null | grep -q started; then
        fail "logs: no 'started' line"
        return
    fi
    if [[ $("${CRICTL[@]}" exec -s "$ctr" cat /vol/out 2>&1) != "$name" ]]; then
        fail "exec: the volume's file is not what the container wrote"
        return
    fi
    if ! "${CRICTL[@]}" exec -s "$ctr" ping -c 1 -W 5 10.88.77.1 >/dev/null 2>&1; then
        fail "network: no answer from the gateway"
        return
    fi
    shim=$(pgrep -f "containerd-shim-husk-v2 .*-id $pod" | head -1)
    [[ -n $shim ]] && fds=$(find "/proc/$shim/fd" -mindepth 1 2>/dev/null | wc -l)
    if [[ $(cat "$d/vol/out" 2>/dev/null) != "$name" ]]; then
        fail "volume: the container's write is not on the host"
        return
    fi
    cri stop stop -t 2 "$ctr" >/dev/null || return
    cri rm rm "$ctr" >/dev/null || return
    ctr=''
    cri stopp stopp "$pod" >/dev/null || return
    cri rmp rmp "$pod" >/dev/null || return
    rm -rf "$d"
    echo "ok $fds" >&3
}

# The warm-up pod: the layer cache and containerd's caches filled, the baseline taken after.
warm=$(pod_cycle soak-warm)
echo "warm-up pod: $warm"
sleep 1
base=$(inventory)
echo "baseline: $base"
echo "$(containerd_mem) (after the warm-up)"

declare -A leaked=()
pods=0 failed=0 maxfds=0
t0=$(now)
for ((c = 1; c <= cycles; c++)); do
    tc0=$(now)
    jobs=()
    for ((k = 0; k < inflight; k++)); do
        pod_cycle "soak-$c-$k" >"$work/result-$k" &
        jobs+=($!)
    done
    # (Not a bare wait: containerd is a job of this shell too.)
    wait "${jobs[@]}"
    ok=0
    for ((k = 0; k < inflight; k++)); do
        r=$(cat "$work/result-$k")
        pods=$((pods + 1))
        if [[ $r == ok* ]]; then
            ok=$((ok + 1))
            fds=${r#ok }
            ((fds > maxfds)) && maxfds=$fds
        else
            failed=$((failed + 1))
            echo "cycle $c pod $k: $r"
        fi
    done
    # What is still going away (a shim exiting after rmp) is not a leak: up to 10 s to settle.
    for ((i = 0; i < 10; i++)); do
        inv=$(inventory)
        [[ $inv == "$base" ]] && break
        sleep 1
    done
    leaks=()
    for kv in $inv; do
        b=$(tr ' ' '\n' <<<"$base" | grep "^${kv%%=*}=")
        if [[ $kv != "$b" ]]; then
            leaks+=("${kv%%=*} ${b#*=}->${kv#*=}")
            leaked[${kv%%=*}]=1
        fi
    done
    echo "cycle $c: $ok of $inflight pods ok in $((($(now) - tc0) / 1000000)) ms; leaks: ${#leaks[@]}${leaks[*]:+ (${leaks[*]})}; $(containerd_mem)"
done
secs=$((($(now) - t0) / 1000000))
inv=$(inventory)
leaks=()
for kv in $inv; do
    b=$(tr ' ' '\n' <<<"$base" | grep "^${kv%%=*}=")
    [[ $kv != "$b" ]] && leaks+=("${kv%%=*} ${b#*=}->${kv#*=}")
done
echo "inventory at the end: $inv"
echo "counters that differed from the baseline after some cycle: ${#leaked[@]}${leaked[*]:+ (${!leaked[*]})}"
echo "most fds a shim held: $maxfds"
echo "$(containerd_mem) (at the end)"
printf 'soak: %d cycles, %d pods (%d failed) in %d.%03d s: %s pods/s; leaks at the end: %d%s\n' \
    "$cycles" "$pods" "$failed" $((secs / 1000)) $((secs % 1000)) \
    "$(awk -v p="$pods" -v ms="$secs" 'BEGIN {printf "%.3f", p * 1000 / ms}')" \
    "${#leaks[@]}" "${leaks[*]:+ (${leaks[*]})}"
