#!/usr/bin/env bash
# What a pod costs the node beyond its container, husk beside runc, measured INSIDE the
# nested-KVM testbed (scripts/bench.sh runs it): containerd with the CRI plugin of
# tests/scripts/cri-env.sh and husk installed from the release build, then PODS idle pods of
# one busybox `sleep` container for each runtime, all running at once. For each pod, its
# processes on the host (its shim and everything under it: for runc the pause and the
# container, for husk the VMM, whose memory holds the guest's, and virtiofsd):
#   memory: their PSS (a page shared between them, or with other pods, counted once in all);
#   cpu:    the CPU time they take over IDLE_SECS of doing nothing, in millicores.
# Printed per pod and as the mean, with husk's minus runc's: the overhead husk's RuntimeClass
# declares (overhead.podFixed) should cover. The CPU under TCG is far above what real KVM
# takes (the guest's timer ticks are emulated); the memory is what it would be. Numbers only.
# Usage: overhead.sh REPO [PODS] [IDLE_SECS]
set -uo pipefail
repo=$1 pods=${2:-3} idle=${3:-20}
# shellcheck source-path=SCRIPTDIR source=../scripts/cri-env.sh
. "$repo/tests/scripts/cri-env.sh"
cri_config && bench_cri_up "$repo" || exit 1
d=$(mktemp -d)
hz=$(getconf CLK_TCK)

# tree PID: PID and every process under it.
tree() {
    local c
    echo "$1"
    for c in $(pgrep -P "$1"); do tree "$c"; done
}

# pod_procs POD_ID: the processes of a pod: its shim's tree.
pod_procs() {
    local shim
    shim=$(pgrep -f "containerd-shim-(runc|husk)-v2 .*-id $1" | head -1)
    [[ -n $shim ]] && tree "$shim"
}

# ticks PID...: their summed user and system CPU time, in clock ticks.
ticks() {
    local p s=0
    for p in "$@"; do
        s=$((s + $(awk '{sub(/.*\) /, ""); print $12 + $13}' "/proc/$p/stat" 2>/dev/null || echo 0)))
    done
    echo "$s"
}

declare -A mem cpu
for runtime in runc husk; do
    untrusted=false
    [[ $runtime == husk ]] && untrusted=true
    ids=()
    for ((i = 0; i < pods; i++)); do
        pod_json "$d/p-$runtime-$i.json" "ovh-$runtime-$i" "$untrusted"
        container_json "$d/c-$runtime-$i.json" "ovh-$runtime-$i" '["sleep","100000"]'
        if ! { p=$("${CRICTL[@]}" runp "$d/p-$runtime-$i.json") &&
            c=$("${CRICTL[@]}" create "$p" "$d/c-$runtime-$i.json" "$d/p-$runtime-$i.json") &&
            "${CRICTL[@]}" start "$c" >/dev/null; }; then
            echo "$runtime pod $i did not start"
            exit 1
        fi
        ids+=("$p")
    done
    # Settled: boots done, the guests idle.
    sleep 10
    declare -A t0
    for p in "${ids[@]}"; do
        mapfile -t procs < <(pod_procs "$p")
        t0[$p]=$(ticks "${procs[@]}")
    done
    sleep "$idle"
    # What each guest uses of its memory (its meminfo, which the container sees).
    if [[ $runtime == husk ]]; then
        for ((i = 0; i < pods; i++)); do
            c=$("${CRICTL[@]}" ps -q --name "ovh-husk-$i" | head -1)
            echo "husk guest $i uses $("${CRICTL[@]}" exec -s "$c" cat /proc/meminfo | awk '/^MemTotal/ {t = $2} /^MemFree/ {f = $2} END {printf "%.1f MiB of %.1f", (t - f) / 1024, t / 1024}')"
        done
    fi
    total_mem=0 total_cpu=0
    for p in "${ids[@]}"; do
        mapfile -t procs < <(pod_procs "$p")
        m=$(pss_kib "${procs[@]}")
        t=$(($(ticks "${procs[@]}") - t0[$p]))
        millicores=$((t * 1000000 / hz / idle / 1000))
        echo "$runtime pod ${p:0:12}: ${#procs[@]} processes, memory $((m / 1024)) MiB (PSS: $(for q in "${procs[@]}"; do echo "$(cat "/proc/$q/comm") $(pss_kib "$q")"; done | awk '{s[$1] += $2} END {for (k in s) printf "%s %.1f, ", k, s[k] / 1024}' | sed 's/, $//')), cpu ${millicores}m idle"
        total_mem=$((total_mem + m))
        total_cpu=$((total_cpu + millicores))
    done
    mem[$runtime]=$((total_mem / pods))
    cpu[$runtime]=$((total_cpu / pods))
    echo "$runtime: mean per pod memory $((mem[$runtime] / 1024)) MiB, cpu ${cpu[$runtime]}m ($pods pods, idle ${idle} s)"
    "${CRICTL[@]}" pods -q | xargs -r "${CRICTL[@]}" stopp >/dev/null
    "${CRICTL[@]}" pods -q | xargs -r "${CRICTL[@]}" rmp -f >/dev/null
done
declared=$(sed -n 's/^ *\(memory\|cpu\): "\(.*\)"$/\1 \2/p' /usr/local/share/husk/runtimeclass.yaml | paste -sd ' ')
echo "overhead of a husk pod over a runc pod: memory $(((mem[husk] - mem[runc]) / 1024)) MiB, cpu $((cpu[husk] - cpu[runc]))m; the RuntimeClass declares $declared"
