#!/usr/bin/env bash
# Pods started from a VM template beside pods that boot their kernel, through containerd,
# measured INSIDE the nested-KVM testbed (scripts/bench.sh runs it): containerd with the CRI
# plugin of tests/scripts/cri-env.sh and husk installed from the release build. For each way
# (templates off, then on: `[pod] templates` in husk's config), PODS pods of one busybox
# `sleep` container are started one after another and left running together:
#   ready:   how long `crictl runp` took (the pod's sandbox ready: VM up, agent answering,
#            sandbox and network set up), and runp + create + start (its container running);
#   restore: for a template's pods, the VMM's own time from its start to the vCPUs' first run;
#   memory:  the summed PSS of the pods' VMMs, idle (a page shared between them counted once).
# The template is made by a warm-up pod first, not counted. Medians and ratios; numbers only.
# Usage: pod-template.sh REPO [PODS]
set -uo pipefail
repo=$1 pods=${2:-10}
# shellcheck source-path=SCRIPTDIR source=../scripts/cri-env.sh
. "$repo/tests/scripts/cri-env.sh"
cri_config && bench_cri_up "$repo" || exit 1
husk=$repo/target/release/husk
[[ -x $husk ]] || husk=$repo/target/debug/husk
d=$(mktemp -d)
cp /etc/husk/config.toml "$d/husk-config" 2>/dev/null || : >"$d/husk-config"

ms() { echo $(($(date +%s%N) / 1000000)); }
median() { sort -n | awk '{a[NR] = $1} END {if (NR % 2) print a[(NR + 1) / 2]; else print int((a[NR / 2] + a[NR / 2 + 1]) / 2)}'; }

# start NAME: a pod and its container; prints "RUNP_MS START_MS POD_ID".
start() {
    local p c t0 t1 t2
    pod_json "$d/$1.json" "$1" true
    container_json "$d/$1-c.json" "$1" '["sleep","100000"]'
    t0=$(ms)
    p=$("${CRICTL[@]}" runp "$d/$1.json") || return 1
    t1=$(ms)
    c=$("${CRICTL[@]}" create "$p" "$d/$1-c.json" "$d/$1.json") && "${CRICTL[@]}" start "$c" >/dev/null || return 1
    t2=$(ms)
    echo "$((t1 - t0)) $((t2 - t0)) $p"
}

clear_pods() {
    "${CRICTL[@]}" pods -q | xargs -r "${CRICTL[@]}" stopp >/dev/null
    "${CRICTL[@]}" pods -q | xargs -r "${CRICTL[@]}" rmp -f >/dev/null
}

declare -A ready full pss
for way in cold template; do
    cp "$d/husk-config" /etc/husk/config.toml
    if [[ $way == cold ]]; then
        printf '\n[pod]\ntemplates = false\n' >>/etc/husk/config.toml
    else
        "$husk" template remove --all
        t0=$(ms)
        start warm-$way >/dev/null || { echo "the warm-up pod did not start"; exit 1; }
        echo "template: made by the warm-up pod (runp to running $(($(ms) - t0)) ms, with the template's making): $("$husk" template list)"
        clear_pods
    fi
    : >"$d/$way.times"
    for ((i = 0; i < pods; i++)); do
        r=$(start "$way-$i") || { echo "$way pod $i did not start"; exit 1; }
        echo "$r" >>"$d/$way.times"
        echo "$way pod $i: runp $(cut -d' ' -f1 <<<"$r") ms, running $(cut -d' ' -f2 <<<"$r") ms"
    done
    ready[$way]=$(cut -d' ' -f1 "$d/$way.times" | median)
    full[$way]=$(cut -d' ' -f2 "$d/$way.times" | median)
    if [[ $way == template ]]; then
        restore=$(find /run/husk/shim -name vmm.log -exec grep -ho 'restored from the snapshot [0-9]* ms' {} + | grep -o '[0-9]*' | median)
        echo "template: the restore alone (the VMM's start to its vCPUs' first run), median $restore ms of $(find /run/husk/shim -name vmm.log -exec grep -l 'restored from the snapshot' {} + | wc -l) pods"
    fi
    sleep 10
    mapfile -t vmms < <(pgrep -x husk-vmm)
    pss[$way]=$(pss_kib "${vmms[@]}")
    echo "$way: ${#vmms[@]} VMMs, summed PSS $((pss[$way] / 1024)) MiB; runp median ${ready[$way]} ms, running median ${full[$way]} ms"
    clear_pods
done
cp "$d/husk-config" /etc/husk/config.toml
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.2f", a / b}'; }
echo "pod ready (runp), template / cold: ${ready[template]} / ${ready[cold]} ms = $(ratio "${ready[template]}" "${ready[cold]}")"
echo "container running (runp + create + start), template / cold: ${full[template]} / ${full[cold]} ms = $(ratio "${full[template]}" "${full[cold]}")"
echo "summed PSS of $pods idle pods' VMMs, template / cold: $((pss[template] / 1024)) / $((pss[cold] / 1024)) MiB = $(ratio "${pss[template]}" "${pss[cold]}")"
