#!/usr/bin/env bash
# Volumes, husk (virtio-fs: the pod's virtiofsd) beside runc (a bind mount), run INSIDE the
# nested-KVM testbed (scripts/bench.sh does that): containerd with the CRI plugin of
# tests/scripts/cri-env.sh, one pod and container per runtime with a host directory as a
# volume, then in the container, timed with /proc/uptime (10 ms resolution):
#   write:  SIZE MiB written sequentially into the volume (dd, 1 MiB blocks, fsync at the end);
#   read:   SIZE MiB the host wrote read sequentially, the host's page cache dropped first;
#   create: FILES empty files made (the shell's own redirection: no process per file);
#   stat:   the same files listed with their attributes (ls -l);
# and for husk the memory the fs device adds to a pod: its virtiofsd processes' private
# memory (and PSS), idle and after the run. Numbers only, never pass/fail.
# Usage: volumes.sh REPO [SIZE_MIB] [FILES] [PASSES]
set -uo pipefail
repo=$1 size=${2:-256} files=${3:-10000} passes=${4:-2}
# shellcheck source-path=SCRIPTDIR source=../scripts/cri-env.sh
. "$repo/tests/scripts/cri-env.sh"
cri_config && bench_cri_up "$repo" || exit 1
d=$(mktemp -d)

# virtiofsd_mem: what every virtiofsd process holds, in KiB: "PRIVATE PSS". Its private
# memory is what it adds; its PSS also counts its share of the VMM's bounce area (a memfd both
# map; virtiofsd never maps guest memory).
virtiofsd_mem() {
    local p priv=0 pss=0
    for p in $(pgrep -x virtiofsd); do
        priv=$((priv + $(awk '/^Private_(Clean|Dirty):/ {s += $2} END {print s}' "/proc/$p/smaps_rollup")))
        pss=$((pss + $(awk '/^Pss:/ {print $2}' "/proc/$p/smaps_rollup")))
    done
    echo "$priv $pss"
}

# timed CTR CMD: seconds CMD takes in container CTR, from its /proc/uptime ("stuck" after
# 300 s, with what the pod's run directory says).
timed() {
    local out
    if ! out=$(timeout 300 "${CRICTL[@]}" exec -s "$1" sh -c "read a _ < /proc/uptime; $2; read b _ < /proc/uptime; echo uptimes \$a \$b"); then
        echo stuck
        echo "stuck: $2" >&2
        find /run/husk/shim -name '*.log' -newer "$d/p.json" -exec tail -n 5 {} + >&2
        return
    fi
    awk '$1 == "uptimes" { printf "%.2f", $3 - $2 }' <<<"$out"
}

# measure LABEL UNTRUSTED PASS
measure() {
    local label=$1 untrusted=$2 pass=$3 p c vol idle
    vol=$d/vol-$label-$pass
    mkdir -p "$vol/small"
    dd if=/dev/zero of="$vol/host-big" bs=1M count="$size" status=none
    pod_json "$d/p.json" "vol-$label-$pass" "$untrusted"
    cat >"$d/c.json" <<EOF
{"metadata": {"name": "vol-$label-$pass"}, "image": {"image": "docker.io/husk/busybox:1"},
 "command": ["sleep", "100000"], "log_path": "vol-$label-$pass.log",
 "mounts": [{"container_path": "/vol", "host_path": "$vol"}]}
EOF
    if ! p=$(timeout 300 "${CRICTL[@]}" runp "$d/p.json") ||
        ! c=$(timeout 300 "${CRICTL[@]}" create "$p" "$d/c.json" "$d/p.json") ||
        ! timeout 300 "${CRICTL[@]}" start "$c" >/dev/null; then
        echo "volumes $label pass $pass: the pod or its container did not start"
        tail -n 20 "$CRI_ROOT/containerd.log"
        return 1
    fi
    idle=$(virtiofsd_mem)
    local w r mk st
    w=$(timed "$c" "dd if=/dev/zero of=/vol/big bs=1M count=$size conv=fsync 2>/dev/null")
    sync && echo 3 >/proc/sys/vm/drop_caches
    r=$(timed "$c" "dd if=/vol/host-big of=/dev/null bs=1M 2>/dev/null")
    mk=$(timed "$c" "i=0; while [ \$i -lt $files ]; do : > /vol/small/f\$i; i=\$((i + 1)); done")
    st=$(timed "$c" "ls -l /vol/small | wc -l >/dev/null")
    local made
    made=$(find "$vol/small" -type f | wc -l)
    awk -v l="$label" -v p="$pass" -v s="$size" -v w="$w" -v r="$r" -v mk="$mk" -v st="$st" -v n="$files" -v m="$made" \
        'BEGIN { printf "volumes %s pass %s: write %d MiB %.1f MB/s (%ss), read %.1f MB/s (%ss), create %d files %ss (%d on the host), stat them %ss", l, p, s, s * 1.048576 / w, w, s * 1.048576 / r, r, n, mk, m, st }'
    if [[ $label == husk ]]; then
        local after
        after=$(virtiofsd_mem)
        awk -v i="$idle" -v a="$after" 'BEGIN { split(i, x, " "); split(a, y, " "); printf ", virtiofsd private %.1f MiB idle, %.1f MiB after (PSS %.1f, %.1f)\n", x[1] / 1024, y[1] / 1024, x[2] / 1024, y[2] / 1024 }'
    else
        echo
    fi
    timeout 300 "${CRICTL[@]}" stopp "$p" >/dev/null && timeout 300 "${CRICTL[@]}" rmp "$p" >/dev/null ||
        echo "volumes $label pass $pass: the pod did not go"
    rm -rf "$vol"
}
for p in $(seq "$passes"); do
    measure runc false "$p"
    measure husk true "$p"
done
rm -rf "$d"
