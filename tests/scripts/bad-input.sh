#!/usr/bin/env bash
# Bad input through CRI, run INSIDE the nested-KVM testbed by tests/tests/bad_input.rs:
# containerd with husk, one husk pod with a healthy container, then requests that must be
# refused with an error naming the problem (or, where CRI gives the value a meaning, run as it
# says), each leaving the pod healthy (an exec into the healthy container still answers). At the
# end the pod is removed and the node must be back at its baseline. One line per case:
#   case NAME: refused: ERROR | case NAME: ran: WHAT | case NAME: ...
# Usage: bad-input.sh REPO HUSK_BINARY
set -uo pipefail
repo=$1 husk=$2
# shellcheck source-path=SCRIPTDIR source=cri-env.sh
. "$repo/tests/scripts/cri-env.sh"

husk_baseline "$husk" || exit 1

pod_json "$work/p.json" bad-input true
p=$("${CRICTL[@]}" runp "$work/p.json") || { echo "the pod did not start"; exit 1; }
container_json "$work/h.json" healthy '["sleep","100000"]'
h=$("${CRICTL[@]}" create "$p" "$work/h.json" "$work/p.json") || { echo "the healthy container was not created"; exit 1; }
"${CRICTL[@]}" start "$h" >/dev/null || { echo "the healthy container did not start"; exit 1; }

# try NAME CONTAINER_JSON_FILE: create (and start) the container; prints the case's line:
# "refused: ERROR" (crictl's last error line) or "ran: its exit and first output line", then
# whether the pod is still healthy. Whatever was created is removed again.
try() {
    local name=$1 json=$2 c out rc
    if ! c=$("${CRICTL[@]}" create "$p" "$json" "$work/p.json" 2>"$work/err"); then
        echo "case $name: refused: $(tail -n 1 "$work/err" ); $(healthy)"
        return
    fi
    if ! "${CRICTL[@]}" start "$c" >/dev/null 2>"$work/err"; then
        echo "case $name: refused at start: $(tail -n 1 "$work/err" ); $(healthy)"
    else
        sleep 2
        out=$("${CRICTL[@]}" logs "$c" 2>&1 | head -n 1 | cut -c1-200)
        rc=$("${CRICTL[@]}" inspect "$c" | grep -o '"exitCode": *[0-9-]*' | grep -o '[0-9-]*$')
        echo "case $name: ran: state $("${CRICTL[@]}" inspect "$c" | grep -o 'CONTAINER_[A-Z]*' | head -1) exit ${rc:-?} output '$out'; $(healthy)"
    fi
    "${CRICTL[@]}" rm -f "$c" >/dev/null 2>&1
}

healthy() {
    if [[ $("${CRICTL[@]}" exec -s "$h" echo alive 2>&1) == alive ]]; then
        echo "pod healthy"
    else
        echo "pod NOT healthy"
    fi
}

# container NAME EXTRA_JSON: a container config (sleep) with EXTRA_JSON's fields added at its
# top level, in $work/NAME.json.
container() {
    python3 - "$work/$1.json" "$1" "$2" <<'PY'
import json, sys
path, name, extra = sys.argv[1], sys.argv[2], sys.argv[3]
c = {"metadata": {"name": name}, "image": {"image": "docker.io/husk/busybox:1"},
     "command": ["sh", "-c", "echo started; exec sleep 100000"], "log_path": name + ".log",
     "linux": {}}
extra = json.loads(extra)
# Too big for an argument: made here.
if extra.get("annotations", {}).get("huge") == "@1MiB":
    extra["annotations"]["huge"] = "x" * (1 << 20)
if extra.get("envs") == "@100000":
    extra["envs"] = [{"key": "K%d" % i, "value": "v%d" % i} for i in range(100000)]
for k, v in extra.items():
    if k == "linux" and isinstance(v, dict):
        c["linux"].update(v)
    else:
        c[k] = v
json.dump(c, open(path, "w"))
PY
    echo "$work/$1.json"
}

try memory-negative "$(container memory-negative '{"linux": {"resources": {"memory_limit_in_bytes": -5}}}')"
try memory-absurd "$(container memory-absurd '{"linux": {"resources": {"memory_limit_in_bytes": 9223372036854775807}}}')"
try memory-tiny "$(container memory-tiny '{"linux": {"resources": {"memory_limit_in_bytes": 4096}}}')"
try cpu-quota-negative "$(container cpu-quota-negative '{"linux": {"resources": {"cpu_quota": -7, "cpu_period": 100000}}}')"
try cpu-period-zero "$(container cpu-period-zero '{"linux": {"resources": {"cpu_quota": 50000, "cpu_period": 0}}}')"
try cpu-period-absurd "$(container cpu-period-absurd '{"linux": {"resources": {"cpu_quota": 50000, "cpu_period": 9223372036854775807}}}')"
try cpu-shares-absurd "$(container cpu-shares-absurd '{"linux": {"resources": {"cpu_shares": 9223372036854775807}}}')"
try cpuset-bad "$(container cpuset-bad '{"linux": {"resources": {"cpuset_cpus": "0-999999"}}}')"
try annotation-huge "$(container annotation-huge '{"annotations": {"huge": "@1MiB"}}')"
try annotation-binary "$(container annotation-binary '{"annotations": {"bin\u0001": "\u0000\u0007\u001b[31m\uffff\u00ff"}}')"
try user-unknown "$(container user-unknown '{"linux": {"security_context": {"run_as_username": "nosuchuser"}}}')"
try command-empty "$(container command-empty '{"command": [""]}')"
try env-100000 "$(container env-100000 '{"envs": "@100000"}')"
mkdir -p "$work/vol"
try mount-dotdot "$(container mount-dotdot "{\"command\": [\"sh\", \"-c\", \"echo started; echo inside > /tmp/escape/f; exec sleep 100000\"], \"mounts\": [{\"container_path\": \"/../../../../tmp/escape\", \"host_path\": \"$work/vol\"}]}")"
# Resolved inside the container's root (/tmp/escape there), never outside it.
echo "mount-dotdot: the volume's file: $(cat "$work/vol/f" 2>/dev/null)"
try device-host "$(container device-host '{"devices": [{"container_path": "/dev/kvm", "host_path": "/dev/kvm", "permissions": "rwm"}]}')"

# The same container name twice in the pod: the second create is refused.
container_json "$work/twice.json" twice '["sleep","100000"]'
c1=$("${CRICTL[@]}" create "$p" "$work/twice.json" "$work/p.json")
if c2=$("${CRICTL[@]}" create "$p" "$work/twice.json" "$work/p.json" 2>"$work/err"); then
    echo "case id-reused: accepted ($c2); $(healthy)"
    "${CRICTL[@]}" rm -f "$c2" >/dev/null 2>&1
else
    echo "case id-reused: refused: $(tail -n 1 "$work/err" ); $(healthy)"
fi
"${CRICTL[@]}" rm -f "$c1" >/dev/null 2>&1

# An exec into a container that has exited.
container_json "$work/exited.json" exited '["true"]'
c=$("${CRICTL[@]}" create "$p" "$work/exited.json" "$work/p.json") && "${CRICTL[@]}" start "$c" >/dev/null
for ((i = 0; i < 100; i++)); do
    grep -q CONTAINER_EXITED <<<"$("${CRICTL[@]}" inspect "$c")" && break
    sleep 0.2
done
if out=$("${CRICTL[@]}" exec -s "$c" echo hi 2>&1); then
    echo "case exec-stopped: accepted ($out); $(healthy)"
else
    echo "case exec-stopped: refused: $(tail -n 1 <<<"$out" ); $(healthy)"
fi
"${CRICTL[@]}" rm -f "$c" >/dev/null 2>&1

"${CRICTL[@]}" rm -f "$h" >/dev/null && "${CRICTL[@]}" stopp "$p" >/dev/null && "${CRICTL[@]}" rmp "$p" >/dev/null ||
    echo "removing the pod failed"
for ((i = 0; i < 30; i++)); do
    inv=$(husk_inventory)
    [[ $inv == "$base" ]] && break
    sleep 1
done
if [[ $inv == "$base" ]]; then
    echo "after: clean"
else
    echo "after: $(inventory_diff "$base" "$inv" | paste -sd ',')"
fi
