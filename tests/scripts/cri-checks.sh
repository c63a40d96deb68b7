#!/usr/bin/env bash
# Run inside the nested-KVM testbed by tests/tests/cri.rs: containerd 1.6 with the CRI plugin
# and crictl, the same pod and container steps with each runtime, timed. Sections as in
# microvm-checks.sh:  === NAME / output / === NAME rc=N
# Usage: cri-checks.sh REPO
set -uo pipefail
repo=$1
# shellcheck source-path=SCRIPTDIR source=cri-env.sh
. "$repo/tests/scripts/cri-env.sh"
now() { date +%s%N; }
ms() { echo $((($2 - $1) / 1000000)); }

# steps RUNTIME_LABEL UNTRUSTED: runp, create, start, logs, exec, stop, rm, stopp, rmp.
steps() {
    local label=$1 untrusted=$2 d pod ctr t0 t1 t2 t3 i
    d=$(mktemp -d)
    pod_json "$d/pod.json" "pod-$label" "$untrusted"
    container_json "$d/c.json" "c-$label" '["sh","-c","echo hello from the container; sleep 1000"]'
    t0=$(now)
    pod=$("${CRICTL[@]}" runp "$d/pod.json") || return 1
    t1=$(now)
    ctr=$("${CRICTL[@]}" create "$pod" "$d/c.json" "$d/pod.json") || return 1
    "${CRICTL[@]}" start "$ctr" >/dev/null || return 1
    t2=$(now)
    for ((i = 0; i < 600; i++)); do
        "${CRICTL[@]}" logs "$ctr" 2>/dev/null | grep -q hello && break
        sleep 0.05
    done
    t3=$(now)
    "${CRICTL[@]}" logs "$ctr"
    "${CRICTL[@]}" exec -s "$ctr" echo exec-ok || return 1
    "${CRICTL[@]}" stop -t 2 "$ctr" >/dev/null && "${CRICTL[@]}" rm "$ctr" >/dev/null &&
        "${CRICTL[@]}" stopp "$pod" >/dev/null && "${CRICTL[@]}" rmp "$pod" >/dev/null || return 1
    echo "timing $label: runp->ready $(ms "$t0" "$t1") ms, create+start $(ms "$t1" "$t2") ms, start->first log line $(ms "$t2" "$t3") ms"
    echo "pods left: $("${CRICTL[@]}" pods -q | wc -l)"
    rm -rf "$d"
}

husk=$repo/target/debug/husk
echo "=== containerd"
cri_config &&
    "$husk" install --config "$CRI_ROOT/config.toml" --bin-dir /usr/local/bin &&
    cri_launch
echo "=== containerd rc=$?"
echo "=== runc"
steps runc false
echo "=== runc rc=$?"

# The untrusted annotation selects husk: the pod is a microVM. (Containers in it come next.)
husk_pod() {
    local d pod t0 t1 rc
    d=$(mktemp -d)
    pod_json "$d/pod.json" pod-husk true
    t0=$(now)
    pod=$("${CRICTL[@]}" runp "$d/pod.json") || { tail -n 20 "$CRI_ROOT/containerd.log"; return 1; }
    t1=$(now)
    echo "timing husk: runp->ready $(ms "$t0" "$t1") ms"
    "${CRICTL[@]}" pods --id "$pod" -o json | grep -o '"state": *"[A-Z_]*"'
    echo "vmm processes: $(pgrep -c husk-vmm)"
    "${CRICTL[@]}" stopp "$pod" >/dev/null && "${CRICTL[@]}" rmp "$pod" >/dev/null
    rc=$?
    sleep 1
    echo "after rmp: vmm $(pgrep -c husk-vmm) shim $(pgrep -c -f containerd-shim-husk) run dirs $(find /run/husk/shim -mindepth 2 -maxdepth 2 2>/dev/null | wc -l) pods $("${CRICTL[@]}" pods -q | wc -l)"
    rm -rf "$d"
    return "$rc"
}
echo "=== husk"
husk_pod
echo "=== husk rc=$?"

# Two pods are two microVMs; SIGKILL to one VMM: its pod is reported not ready (the sandbox
# task exited), the other runs on, and both are removed without leftovers.
husk_two_pods() {
    local d p1 p2 vmm1 i state
    d=$(mktemp -d)
    pod_json "$d/p1.json" pod-a true
    pod_json "$d/p2.json" pod-b true
    p1=$("${CRICTL[@]}" runp "$d/p1.json") && p2=$("${CRICTL[@]}" runp "$d/p2.json") || return 1
    echo "vmm processes: $(pgrep -c husk-vmm)"
    vmm1=$(pgrep -f "husk-vmm.*/$p1/" | head -1)
    [[ -n $vmm1 ]] || { echo "no VMM found for pod $p1"; pgrep -af husk-vmm; return 1; }
    kill -KILL "$vmm1"
    for ((i = 0; i < 100; i++)); do
        state=$("${CRICTL[@]}" pods --id "$p1" -o json | grep -o 'SANDBOX_[A-Z]*' | head -1)
        [[ $state == SANDBOX_NOTREADY ]] && break
        sleep 0.2
    done
    echo "killed pod: $state"
    echo "other pod: $("${CRICTL[@]}" pods --id "$p2" -o json | grep -o 'SANDBOX_[A-Z]*' | head -1)"
    echo "vmm processes: $(pgrep -c husk-vmm)"
    for p in "$p1" "$p2"; do
        "${CRICTL[@]}" stopp "$p" >/dev/null && "${CRICTL[@]}" rmp "$p" >/dev/null || return 1
    done
    sleep 1
    echo "after rmp: vmm $(pgrep -c husk-vmm) shim $(pgrep -c -f containerd-shim-husk) run dirs $(find /run/husk/shim -mindepth 2 -maxdepth 2 2>/dev/null | wc -l) pods $("${CRICTL[@]}" pods -q | wc -l)"
    rm -rf "$d"
}
echo "=== husk_two_pods"
husk_two_pods
echo "=== husk_two_pods rc=$?"

# containerd restarts: the pod's shim and VM live on, containerd reconnects to them, and the
# pod still stops and goes.
husk_restart() {
    local d p vmm
    d=$(mktemp -d)
    pod_json "$d/p.json" pod-r true
    p=$("${CRICTL[@]}" runp "$d/p.json") || return 1
    vmm=$(pgrep -f "husk-vmm.*/$p/" | head -1)
    cri_restart || { echo "containerd did not come back"; return 1; }
    echo "after restart: $("${CRICTL[@]}" pods --id "$p" -o json | grep -o 'SANDBOX_[A-Z]*' | head -1), same vmm $(kill -0 "$vmm" 2>/dev/null && echo yes || echo no)"
    "${CRICTL[@]}" stopp "$p" >/dev/null && "${CRICTL[@]}" rmp "$p" >/dev/null || return 1
    sleep 1
    echo "after rmp: vmm $(pgrep -c husk-vmm) shim $(pgrep -c -f containerd-shim-husk) run dirs $(find /run/husk/shim -mindepth 2 -maxdepth 2 2>/dev/null | wc -l) pods $("${CRICTL[@]}" pods -q | wc -l)"
    rm -rf "$d"
}
echo "=== husk_restart"
husk_restart
echo "=== husk_restart rc=$?"

# A pod whose VM cannot start fails runp with why, and leaves nothing.
echo "=== husk_no_kernel"
cache=${HUSK_CACHE:-/var/cache/husk}/current
mv "$cache/vmlinux" "$cache/vmlinux.away"
d=$(mktemp -d)
pod_json "$d/pod.json" pod-nokernel true
"${CRICTL[@]}" runp "$d/pod.json" 2>&1 | grep -o "the guest kernel [^ ]* does not exist"
mv "$cache/vmlinux.away" "$cache/vmlinux"
sleep 1
echo "after: vmm $(pgrep -c husk-vmm) shim $(pgrep -c -f containerd-shim-husk) pods $("${CRICTL[@]}" pods -q | wc -l)"
echo "=== husk_no_kernel rc=0"
cri_stop
