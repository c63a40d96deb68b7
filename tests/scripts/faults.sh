#!/usr/bin/env bash
# Faults, run INSIDE the nested-KVM testbed by tests/tests/faults.rs: containerd with husk, a
# baseline inventory (tests/scripts/cri-env.sh's husk_inventory) after a warm-up pod, then
#   - SIGKILL of the shim, of the VMM and of containerd at points inside runp, create and start
#     (a delay after the step began), containerd started again after its own kill;
#   - a guest kernel panic (a privileged container writes 'c' to /proc/sysrq-trigger);
#   - a guest that stops answering (its VMM SIGSTOPped): an exec into it, then its stopp;
#   - a guest stuck in its boot (its first VMM SIGSTOPped inside runp): booted again;
# after each, every pod is removed (`rmp -f`, as a kubelet would) and the node must come back
# to its baseline within 60 s ("after: clean", or what differs), and at the end a pod must
# still go through its whole life. One line per fault:
#   fault NAME: WHAT HAPPENED; after: clean|LEAKS
# Usage: faults.sh REPO HUSK_BINARY [GROUP...]   (groups: shim vmm containerd panic stopped hang; all
# by default; and peer: containerd killed inside a runc pod's runp, the runc shims left). A kill
# group runs at 8 points (runp at 400, 1500 and 3500 ms, create at 60, 200 and 800, start at 100
# and 400), or at those it names: TARGET@STEP:MS,STEP:MS (e.g. vmm@runp:1500,start:100).
set -uo pipefail
repo=$1 husk=$2
# shellcheck source-path=SCRIPTDIR source=cri-env.sh
. "$repo/tests/scripts/cri-env.sh"
now() { date +%s%N; }
ms_since() { echo $((($(now) - $1) / 1000000)); }

husk_baseline "$husk" || exit 1

# remove_all: every container and pod removed as a kubelet would (rm -f, stopp, rmp -f).
remove_all() {
    local c p
    for c in $("${CRICTL[@]}" ps -aq 2>/dev/null); do
        "${CRICTL[@]}" rm -f "$c" >/dev/null 2>&1
    done
    for p in $("${CRICTL[@]}" pods -q 2>/dev/null); do
        "${CRICTL[@]}" stopp "$p" >/dev/null 2>&1
        "${CRICTL[@]}" rmp -f "$p" >/dev/null 2>&1
    done
}

# after [containerd]: every container and pod removed as a kubelet would (rm -f, stopp, rmp -f),
# then the inventory back at its baseline within 120 s (a shim that containerd forgot exits after
# 60 s with nothing to serve): "after: clean" or "after: LEAKS", and then what was left. With
# "containerd" (containerd itself was killed), network namespaces of containerd's own are named
# and removed, not counted: see containerd_own_netns.
after() {
    local i inv diff own netns_only='^netns [0-9]+->[0-9]+$'
    remove_all
    for ((i = 0; i < 120; i++)); do
        inv=$(husk_inventory)
        [[ $inv == "$base" ]] && { echo "after: clean"; return 0; }
        diff=$(inventory_diff "$base" "$inv" | paste -sd ',')
        # No pod is left to remove a namespace later: containerd's own is known at once.
        if [[ ${1:-} == containerd && $diff =~ $netns_only ]] && own=$(containerd_own_netns); then
            echo "after: clean; containerd's own left: $own"
            return 0
        fi
        sleep 1
    done
    echo "after: $diff"
    leftovers
    netns_leftovers
}

# containerd_own_netns: CRI makes a pod's network namespace (cni-UUID: a file under /run/netns
# with the namespace bind-mounted on it) before it records the pod, and removes it when the
# pod's setup fails, unless containerd dies in between: then no pod has it and nothing removes
# it, for runc's pods as for husk's. With every pod removed, each one left must be such a one:
# named cni-*, and either holding nothing but its loopback (no CNI veth, nothing of husk's: no
# tap, no filter) or never mounted (containerd died between the file and the mount). Each is
# named and removed (the next fault starts from the baseline); fails, removing nothing, when
# one is not.
containerd_own_netns() {
    local f name links found=() mounted=()
    for f in /run/netns/*; do
        [[ -e $f ]] || continue
        name=${f##*/}
        [[ $name == cni-* ]] || return 1
        if mountpoint -q "$f"; then
            links=$(ip -n "$name" -o link show | awk -F': ' '{print $2}' | paste -sd ' ')
            [[ $links == lo ]] || return 1
            found+=("$name (lo only)")
            mounted+=("$name")
        elif [[ ! -s $f ]]; then
            found+=("$name (never mounted)")
        else
            return 1
        fi
    done
    ((${#found[@]})) || return 1
    for f in /run/netns/cni-*; do
        name=${f##*/}
        if [[ " ${mounted[*]} " == *" $name "* ]]; then
            ip netns delete "$name" || return 1
        else
            rm -f "$f" || return 1
        fi
    done
    echo "netns ${found[*]}"
}

# netns_leftovers: each network namespace file left, what it is and what it holds.
netns_leftovers() {
    local f
    for f in /run/netns/*; do
        [[ -e $f ]] || continue
        echo "    | netns ${f##*/}: $(mountpoint -q "$f" && echo mounted || echo "not mounted, $(stat -c %s "$f") bytes"); links: $(
            ip -n "${f##*/}" -o link show 2>&1 | awk -F': ' '{print $2}' | paste -sd ' ')"
    done
}

# leftovers: the shims left, each with its age, its pod, whether containerd still has its
# bundle and where its threads wait; and what containerd logged of that pod.
leftovers() {
    local pid id ns
    for pid in $(pgrep -f 'containerd-shim-husk-v2 .*-id'); do
        echo "    | shim $pid: $(tr '\0' ' ' </proc/"$pid"/cmdline | cut -c1-300); waits in $(
            cat /proc/"$pid"/task/*/wchan 2>/dev/null | sort | uniq -c | paste -sd ' ')"
        id=$(tr '\0' '\n' </proc/"$pid"/cmdline | grep -A1 -x -- -id | tail -n 1)
        ns=$(tr '\0' '\n' </proc/"$pid"/cmdline | grep -A1 -x -- -namespace | tail -n 1)
        echo "    | shim $pid ($(ps -o etimes= -p "$pid") s, parent $(ps -o ppid= -p "$pid")) pod $id: bundle $(
            [[ -d $CRI_ROOT/state/io.containerd.runtime.v2.task/$ns/$id ]] && echo kept || echo gone)," \
            "children $(pgrep -c -P "$pid")"
        grep -F "$id" "$CRI_ROOT/containerd.log" | tail -n 12 | cut -c1-400 | sed 's/^/    |   /'
    done
    echo "    | containerd's warnings and errors since the fault began:"
    tail -n "+${fault_from:-1}" "$CRI_ROOT/containerd.log" | grep -E 'level=(warning|error|fatal)' |
        tail -n 30 | cut -c1-400 | sed 's/^/    |   /'
}

# kill_during TARGET STEP DELAY_MS: STEP (runp, create, start) of a new husk pod begins, and
# DELAY_MS later TARGET (shim, vmm, containerd) gets SIGKILL.
kill_during() {
    local target=$1 step=$2 delay=$3 d p='' c='' bg rc pid
    d=$work/kill-$target-$step-$delay
    mkdir -p "$d"
    fault_from=$(($(wc -l <"$CRI_ROOT/containerd.log") + 1))
    pod_json "$d/p.json" "k-$target-$step-$delay" true
    container_json "$d/c.json" "k-$target-$step-$delay" '["sleep","1000"]'
    if [[ $step != runp ]]; then
        p=$("${CRICTL[@]}" runp "$d/p.json") || { echo "fault $target in $step: the pod did not start"; return 1; }
    fi
    if [[ $step == start ]]; then
        c=$("${CRICTL[@]}" create "$p" "$d/c.json" "$d/p.json") || { echo "fault $target in $step: no container"; return 1; }
    fi
    case $step in
    runp) "${CRICTL[@]}" runp "$d/p.json" >"$d/out" 2>&1 & ;;
    create) "${CRICTL[@]}" create "$p" "$d/c.json" "$d/p.json" >"$d/out" 2>&1 & ;;
    start) "${CRICTL[@]}" start "$c" >"$d/out" 2>&1 & ;;
    esac
    bg=$!
    sleep "$(awk -v ms="$delay" 'BEGIN {print ms / 1000}')"
    case $target in
    shim) pid=$(pgrep -f containerd-shim-husk-v2 | head -1) ;;
    vmm) pid=$(pgrep husk-vmm | head -1) ;;
    containerd) pid=$(cat "$CRI_ROOT/containerd.pid") ;;
    esac
    local killed="nothing to kill yet"
    if [[ -n $pid ]] && kill -KILL "$pid" 2>/dev/null; then
        killed="killed after the step ended"
        if kill -0 "$bg" 2>/dev/null; then
            killed="killed inside the step"
        fi
    fi
    wait "$bg"
    rc=$?
    [[ $target == containerd ]] && { cri_again || { echo "containerd did not come back"; return 1; }; }
    local end
    end=$(after "$target")
    echo "fault $target ${delay} ms into $step: $killed; $step rc=$rc ($(tail -n 1 "$d/out" | rev | cut -c1-200 | rev));" \
        "shims ended idle $(tail -n "+$fault_from" "$CRI_ROOT/containerd.log" | grep -c 'containerd died while it started the pod'); $end"
    rm -rf "$d"
}

# running_pod DIR: the pod of DIR/p.json with the container of DIR/c.json started; sets p, c.
running_pod() {
    p=$("${CRICTL[@]}" runp "$1/p.json") || return 1
    c=$("${CRICTL[@]}" create "$p" "$1/c.json" "$1/p.json") || return 1
    "${CRICTL[@]}" start "$c" >/dev/null
}

# guest_panic: the guest kernel panics (panic=-1 resets it; the VMM exits): the pod is
# reported not ready and its container exited, within a bound.
guest_panic() {
    local d p c t
    d=$work/panic
    mkdir -p "$d"
    POD_LINUX='"security_context": {"privileged": true}' pod_json "$d/p.json" panic true
    container_json "$d/c.json" panic '["sleep","1000"]' '"security_context": {"privileged": true}'
    running_pod "$d" || { echo "fault guest panic: the pod or its container did not start"; return 1; }
    t=$(now)
    "${CRICTL[@]}" exec -s "$c" sh -c 'echo c > /proc/sysrq-trigger' >/dev/null 2>&1
    local i state=''
    for ((i = 0; i < 300; i++)); do
        state="$("${CRICTL[@]}" pods --id "$p" -o json | grep -o 'SANDBOX_[A-Z]*' | head -1) $("${CRICTL[@]}" inspect "$c" | grep -o 'CONTAINER_[A-Z]*' | head -1)"
        [[ $state == "SANDBOX_NOTREADY CONTAINER_EXITED" ]] && break
        sleep 0.2
    done
    echo "fault guest panic: $state after $(ms_since "$t") ms, vmm $(pgrep -c husk-vmm); $(after)"
    rm -rf "$d"
}

# guest_stopped: the pod's VMM is SIGSTOPped (a guest that stops answering): an exec fails
# within the agent client's RPC deadline, naming it, and stopp ends the pod.
guest_stopped() {
    local d p c t vmm out rc
    d=$work/stopped
    mkdir -p "$d"
    pod_json "$d/p.json" stopped true
    container_json "$d/c.json" stopped '["sleep","1000"]'
    running_pod "$d" || { echo "fault guest stopped: the pod or its container did not start"; return 1; }
    vmm=$(pgrep -f "husk-vmm.*/$p/" | head -1)
    kill -STOP "$vmm"
    t=$(now)
    out=$(crictl --config "$CRI_ROOT/crictl.yaml" --timeout 300s exec -s "$c" echo hi 2>&1)
    rc=$?
    echo "fault guest stopped, exec: rc=$rc after $(ms_since "$t") ms ($(tail -n 1 <<<"$out" | cut -c1-200))"
    t=$(now)
    out=$(crictl --config "$CRI_ROOT/crictl.yaml" --timeout 300s stopp "$p" 2>&1)
    rc=$?
    echo "fault guest stopped, stopp: rc=$rc after $(ms_since "$t") ms ($(tail -n 1 <<<"$out" | cut -c1-200)); vmm $(pgrep -c husk-vmm); $(after)"
    # Never leave a stopped process behind for the next fault.
    pkill -KILL husk-vmm
    rm -rf "$d"
}

# boot_hang: a guest stuck in its boot: the pod's first VMM is SIGSTOPped as soon as it runs,
# inside runp. The shim finds the agent not ready within its boot timeout (a VM template's
# clone: within 20 s), logs it, takes that VM apart and boots a new one: runp goes through,
# slower, with nothing of the first VM left.
boot_hang() {
    local d p='' c='' bg t i vmm='' out
    d=$work/hang
    mkdir -p "$d"
    pod_json "$d/p.json" hang true
    container_json "$d/c.json" hang '["sleep","1000"]'
    t=$(now)
    crictl --config "$CRI_ROOT/crictl.yaml" --timeout 300s runp "$d/p.json" >"$d/out" 2>&1 &
    bg=$!
    for ((i = 0; i < 600; i++)); do
        vmm=$(pgrep -n husk-vmm)
        [[ -n $vmm ]] && break
        sleep 0.05
    done
    [[ -n $vmm ]] && kill -STOP "$vmm"
    wait "$bg" && p=$(tail -n 1 "$d/out")
    if [[ -n $p ]]; then out="runp ok"; else out="runp failed ($(tail -n 1 "$d/out" | cut -c1-200))"; fi
    out+=" after $(ms_since "$t") ms"
    [[ -n $p ]] && c=$("${CRICTL[@]}" create "$p" "$d/c.json" "$d/p.json") &&
        "${CRICTL[@]}" start "$c" >/dev/null &&
        out+=", container $("${CRICTL[@]}" exec -s "$c" echo alive 2>&1)"
    echo "fault boot hang (first VMM $([[ -n $vmm ]] && echo stopped || echo 'never seen')): $out; the first VMM $(kill -0 "$vmm" 2>/dev/null && echo left || echo gone); hung boots logged $(grep -c -e 'boot attempt 1 hung' -e "template's clone did not answer" "$CRI_ROOT/containerd.log"); $(after)"
    pkill -KILL husk-vmm
    rm -rf "$d"
}

# peer_containerd_kill DELAY_MS: the peer under the same fault: a runc pod's runp, containerd
# SIGKILLed DELAY_MS into it and started again, every pod removed; the runc shims left after 45 s
# (containerd 1.6 leaves one behind, as it does husk's).
peer_containerd_kill() {
    local d=$work/peer-$1 bg
    mkdir -p "$d"
    pod_json "$d/p.json" "peer-$1" false
    "${CRICTL[@]}" runp "$d/p.json" >"$d/out" 2>&1 &
    bg=$!
    sleep "$(awk -v ms="$1" 'BEGIN {print ms / 1000}')"
    kill -KILL "$(cat "$CRI_ROOT/containerd.pid")"
    wait "$bg"
    cri_again || { echo "containerd did not come back"; return 1; }
    remove_all
    sleep 45
    echo "peer runc, containerd killed $1 ms into runp: runc shims left $(pgrep -c -f containerd-shim-runc-v2), pods $("${CRICTL[@]}" pods -q | wc -l), netns $(ip netns list | wc -l)"
    rm -rf "$d"
}

# bounded SECS NAME FUNCTION ARGS...: FUNCTION ARGS in the background; one that takes more than
# SECS is a hang: named, with what runs and containerd's last log lines, and then killed.
bounded() {
    local secs=$1 name=$2 pid i
    shift 2
    "$@" &
    pid=$!
    for ((i = 0; i < secs; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 1
    done
    if kill -0 "$pid" 2>/dev/null; then
        echo "fault $name: hung for more than $secs s; after: not checked"
        pgrep -a -f 'crictl|containerd|husk|virtiofsd' | cut -c1-200 | sed 's/^/    | /'
        tail -n 40 "$CRI_ROOT/containerd.log" | cut -c1-300 | sed 's/^/    | /'
        pkill -KILL -P "$pid"
        kill -KILL "$pid"
    fi
    wait "$pid" 2>/dev/null
}

groups=("${@:3}")
((${#groups[@]})) || groups=(shim vmm containerd panic stopped hang)
for g in "${groups[@]}"; do
    case ${g%%@*} in
    shim | vmm | containerd)
        points="runp:400 runp:1500 runp:3500 create:60 create:200 create:800 start:100 start:400"
        [[ $g == *@* ]] && points=${g#*@} && points=${points//,/ }
        for fault in $points; do
            bounded 600 "${g%%@*} in ${fault%%:*} at ${fault#*:} ms" kill_during "${g%%@*}" "${fault%%:*}" "${fault#*:}"
        done
        ;;
    peer) for ms in 400 1500; do bounded 600 "peer at $ms ms" peer_containerd_kill "$ms"; done ;;
    panic) bounded 600 "guest panic" guest_panic ;;
    stopped) bounded 600 "guest stopped" guest_stopped ;;
    hang) bounded 600 "boot hang" boot_hang ;;
    *) echo "faults.sh: unknown group $g" && exit 2 ;;
    esac
done
echo "the node afterwards, a pod's whole life: $(pod_life final "$work/final")"
