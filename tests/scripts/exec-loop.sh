#!/usr/bin/env bash
# A loop of execs into husk pods, run INSIDE the nested-KVM testbed (scripts/exec-loop.sh
# starts it there): the soak's exec steps (a file read from a live volume, a ping of the CNI
# gateway) many times over, PODS pods at once, without the boots in between, to reproduce
# quickly whatever makes one of them hang. Each exec is bounded (EXEC_LIMIT s); a crictl call
# that waits 150 s is reported while it waits (stall_watch, "stall: " lines). Numbers only:
#   exec-loop: E execs in S s (H hung, F failed)
# Usage: exec-loop.sh REPO HUSK_BINARY ROUNDS PODS
set -uo pipefail
repo=$1 husk=$2 rounds=$3 npods=$4
CRI_TIMEOUT=300s
EXEC_LIMIT=${EXEC_LIMIT:-240}
# shellcheck source-path=SCRIPTDIR source=cri-env.sh
. "$repo/tests/scripts/cri-env.sh"

CRI_TMPFS_SIZE=2g husk_cri_up "$husk" || exit 1
STALL_HUSK=$husk stall_watch 150
work=$(mktemp -d)
pods=() ctrs=()
for ((p = 0; p < npods; p++)); do
    d=$work/p$p
    mkdir -p "$d/vol"
    pod_json "$d/pod.json" "exec-loop-$p" true
    cat >"$d/c.json" <<EOF
{"metadata": {"name": "c$p"}, "image": {"image": "docker.io/husk/busybox:1"},
 "command": ["sh", "-c", "echo p$p > /vol/out && exec sleep 100000"],
 "mounts": [{"container_path": "/vol", "host_path": "$d/vol"}],
 "log_path": "c$p.log", "linux": {}}
EOF
    pod=$("${CRICTL[@]}" runp "$d/pod.json") || exit 1
    ctr=$("${CRICTL[@]}" create "$pod" "$d/c.json" "$d/pod.json") || exit 1
    "${CRICTL[@]}" start "$ctr" >/dev/null || exit 1
    pods+=("$pod") ctrs+=("$ctr")
done
echo "=== $npods pods up"

# one_exec P: both exec steps of the soak in pod P, each bounded; prints "ok", "hung STEP" or
# "failed STEP".
one_exec() {
    local p=$1 ctr=${ctrs[$1]} out rc
    out=$(timeout "$EXEC_LIMIT" "${CRICTL[@]}" exec -s "$ctr" cat /vol/out 2>&1)
    rc=$?
    ((rc == 124)) && { echo "hung cat"; return; }
    [[ $out == "p$p" ]] || { echo "failed cat: $out"; return; }
    timeout "$EXEC_LIMIT" "${CRICTL[@]}" exec -s "$ctr" ping -c 1 -W 5 10.88.77.1 >/dev/null 2>&1
    rc=$?
    ((rc == 124)) && { echo "hung ping"; return; }
    ((rc == 0)) || { echo "failed ping: exit $rc"; return; }
    echo ok
}

execs=0 hung=0 failed=0
t0=$(date +%s)
for ((r = 1; r <= rounds; r++)); do
    jobs=()
    for ((p = 0; p < npods; p++)); do
        one_exec "$p" >"$work/r$p" &
        jobs+=($!)
    done
    # (Not a bare wait: containerd is a job of this shell too.)
    wait "${jobs[@]}"
    for ((p = 0; p < npods; p++)); do
        execs=$((execs + 2))
        res=$(cat "$work/r$p")
        case $res in
        ok) ;;
        hung*) hung=$((hung + 1)); echo "round $r pod $p: $res" ;;
        *) failed=$((failed + 1)); echo "round $r pod $p: $res" ;;
        esac
    done
    ((r % 50 == 0)) && echo "=== round $r: $execs execs, $hung hung, $failed failed, $(($(date +%s) - t0)) s"
    ((hung >= 2)) && break
done
echo "exec-loop: $execs execs in $(($(date +%s) - t0)) s ($hung hung, $failed failed)"
for ((p = 0; p < npods; p++)); do
    "${CRICTL[@]}" rm -f "${ctrs[$p]}" >/dev/null 2>&1
    "${CRICTL[@]}" stopp "${pods[$p]}" >/dev/null 2>&1
    "${CRICTL[@]}" rmp -f "${pods[$p]}" >/dev/null 2>&1
done
((hung == 0 && failed == 0))
