#!/usr/bin/env bash
# Pod-to-pod networking, husk <-> husk beside runc <-> runc, run INSIDE the nested-KVM testbed
# (scripts/bench.sh does that): containerd with the CRI plugin and the CNI bridge of
# tests/scripts/cri-env.sh, a server pod (busybox httpd) and a client pod per runtime, then
#   throughput: the client fetches SIZE MiB from the server over HTTP/1.0 (nc), timed in the
#               client with /proc/uptime (10 ms resolution);
#   latency:    ROUNDS small HTTP/1.0 requests one after the other (a TCP connection and an nc
#               process each, and a fork of httpd in the server), and ROUNDS pings (the
#               network's own round trip);
#   runp:       crictl runp -> ready of the server pod, and for husk the shim's time to wire
#               the pod's network (its log line), which is what networking adds to it.
# Numbers only, never pass/fail.
# Usage: net-pods.sh REPO [SIZE_MIB] [ROUNDS] [PASSES]
set -uo pipefail
repo=$1 size=${2:-32} rounds=${3:-20} passes=${4:-2}
# shellcheck source-path=SCRIPTDIR source=../scripts/cri-env.sh
. "$repo/tests/scripts/cri-env.sh"
cri_config && bench_cri_up "$repo" || exit 1
d=$(mktemp -d)
serve="[\"sh\",\"-c\",\"mkdir -p /www && echo pong > /www/index.html && dd if=/dev/zero of=/www/big bs=65536 count=$((size * 16)) 2>/dev/null && httpd -f -p 8080 -h /www\"]"
now() { date +%s%N; }

# measure LABEL UNTRUSTED PASS
measure() {
    local label=$1 untrusted=$2 pass=$3 s c sc cc sip t0 t1 out wired
    pod_json "$d/s.json" "net-$label-s$pass" "$untrusted"
    pod_json "$d/c.json" "net-$label-c$pass" "$untrusted"
    container_json "$d/sc.json" "srv-$label$pass" "$serve"
    container_json "$d/cc.json" "cli-$label$pass" '["sleep","100000"]'
    t0=$(now)
    s=$("${CRICTL[@]}" runp "$d/s.json") || return 1
    t1=$(now)
    c=$("${CRICTL[@]}" runp "$d/c.json") || return 1
    sc=$("${CRICTL[@]}" create "$s" "$d/sc.json" "$d/s.json") && "${CRICTL[@]}" start "$sc" >/dev/null || return 1
    cc=$("${CRICTL[@]}" create "$c" "$d/cc.json" "$d/c.json") && "${CRICTL[@]}" start "$cc" >/dev/null || return 1
    sip=$("${CRICTL[@]}" inspectp "$s" | grep -o '"ip": *"[0-9.]*"' | head -1 | grep -o '[0-9.]*[0-9]')
    local X=("${CRICTL[@]}" exec -s "$cc")
    local i
    for ((i = 0; i < 100; i++)); do
        grep -q pong <<<"$("${X[@]}" sh -c "printf 'GET / HTTP/1.0\r\n\r\n' | nc -w 5 $sip 8080" 2>/dev/null)" && break
        sleep 0.2
    done
    out=$("${X[@]}" sh -c "read a _ < /proc/uptime; printf 'GET /big HTTP/1.0\r\n\r\n' | nc -w 30 $sip 8080 | wc -c; read b _ < /proc/uptime; echo \$a \$b" | xargs)
    local got a b
    read -r got a b <<<"$out"
    local thr
    thr=$(awk -v n="$got" -v a="$a" -v b="$b" 'BEGIN { printf "%.1f", n / (b - a) / 1e6 }')
    out=$("${X[@]}" sh -c "read a _ < /proc/uptime; i=0; while [ \$i -lt $rounds ]; do printf 'GET / HTTP/1.0\r\n\r\n' | nc -w 5 $sip 8080 >/dev/null; i=\$((i + 1)); done; read b _ < /proc/uptime; echo \$a \$b" | xargs)
    read -r a b <<<"$out"
    local lat
    lat=$(awk -v a="$a" -v b="$b" -v r="$rounds" 'BEGIN { printf "%.1f", (b - a) / r * 1000 }')
    # The network's own round trip, without a process spawned per request (nc in the client,
    # httpd's fork in the server), which a nested guest pays dearly for under shadow paging.
    local rtt
    rtt=$("${X[@]}" ping -c "$rounds" "$sip" 2>&1 | grep -o 'min/avg/max = [0-9./]*' | cut -d/ -f5)
    wired=$(grep -o "pod $s: network wired in [0-9]* ms" "$CRI_ROOT/containerd.log" | grep -o '[0-9]* ms' | head -1)
    echo "net $label pass $pass: runp->ready $(((t1 - t0) / 1000000)) ms${wired:+ (network wired in $wired)}, throughput $thr MB/s ($got bytes), request/response $lat ms (mean of $rounds), ping rtt avg ${rtt:-?} ms"
    "${CRICTL[@]}" stopp "$s" "$c" >/dev/null && "${CRICTL[@]}" rmp "$s" "$c" >/dev/null
}
for p in $(seq "$passes"); do
    measure runc false "$p"
    measure husk true "$p"
done
rm -rf "$d"
