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

# wait_log CTR TEXT: waits (at most 30 s) until the container's log holds TEXT.
wait_log() {
    local i
    for ((i = 0; i < 600; i++)); do
        grep -q "$2" <<<"$("${CRICTL[@]}" logs "$1" 2>/dev/null)" && return 0
        sleep 0.05
    done
    return 1
}

# wait_stopped SECS CTR [POD]: waits (at most SECS) until the container has exited and, when
# given, the pod is not ready.
wait_stopped() {
    local i
    for ((i = 0; i < $1 * 5; i++)); do
        { [[ -z ${3:-} ]] || grep -q SANDBOX_NOTREADY <<<"$("${CRICTL[@]}" pods --id "$3" -o json)"; } &&
            grep -q CONTAINER_EXITED <<<"$("${CRICTL[@]}" inspect "$2")" && return 0
        sleep 0.2
    done
    return 1
}

# pod_ip POD, pod_netns POD: the pod's IP and its network namespace's path, from inspectp.
pod_ip() { "${CRICTL[@]}" inspectp "$1" | grep -o '"ip": *"[0-9.]*"' | head -1 | grep -o '[0-9.]*[0-9]'; }
pod_ip6() { "${CRICTL[@]}" inspectp "$1" | grep -o '"ip": *"fd88:[0-9a-f:]*"' | head -1 | grep -o 'fd88:[0-9a-f:]*'; }
pod_netns() { "${CRICTL[@]}" inspectp "$1" | grep -o '"/var/run/netns/[^"]*"\|"/run/netns/[^"]*"' | head -1 | tr -d '"'; }
# vmm_layers POD: how many layer files (cached images, or a container's own, unlinked) the
# pod's VMM holds open.
vmm_layers() {
    local vmm
    vmm=$(pgrep -f "husk-vmm.*/$1/" | head -1)
    [[ -n $vmm ]] || { echo "no VMM"; return; }
    find "/proc/$vmm/fd" \( -lname '*.img' -o -lname '*.layer*' \) 2>/dev/null | wc -l
}
# netns_tc POD: what husk wired in the pod's network namespace (ingress qdiscs, mirred
# filters on eth0, the tap).
netns_tc() {
    local ns
    ns=$(pod_netns "$1")
    ns=${ns##*/}
    echo "qdiscs $(ip netns exec "$ns" tc qdisc show | grep -c ingress) filters $(ip netns exec "$ns" tc filter show dev eth0 ingress | grep -c mirred) tap $(ip netns exec "$ns" ip -o link show | grep -c husk-tap0)"
}

# steps RUNTIME_LABEL UNTRUSTED: runp, create, start, logs, exec, stop, rm, stopp, rmp.
steps() {
    local label=$1 untrusted=$2 d pod ctr t0 t1 t2 t3
    d=$(mktemp -d)
    pod_json "$d/pod.json" "pod-$label" "$untrusted"
    container_json "$d/c.json" "c-$label" '["sh","-c","echo hello from the container; sleep 1000"]'
    t0=$(now)
    pod=$("${CRICTL[@]}" runp "$d/pod.json") || return 1
    t1=$(now)
    ctr=$("${CRICTL[@]}" create "$pod" "$d/c.json" "$d/pod.json") || return 1
    "${CRICTL[@]}" start "$ctr" >/dev/null || return 1
    t2=$(now)
    wait_log "$ctr" hello
    t3=$(now)
    "${CRICTL[@]}" logs "$ctr"
    "${CRICTL[@]}" exec -s "$ctr" echo exec-ok || return 1
    "${CRICTL[@]}" stop -t 2 "$ctr" >/dev/null && "${CRICTL[@]}" rm "$ctr" >/dev/null &&
        "${CRICTL[@]}" stopp "$pod" >/dev/null && "${CRICTL[@]}" rmp "$pod" >/dev/null || return 1
    echo "timing $label: runp->ready $(ms "$t0" "$t1") ms, create+start $(ms "$t1" "$t2") ms, start->first log line $(ms "$t2" "$t3") ms"
    echo "pods left: $("${CRICTL[@]}" pods -q | wc -l)"
    rm -rf "$d"
}

# ended NAME RC: a section's end marker; a failed section also shows containerd's last log
# lines (the husk shim's among them, with a VM's last words when one ended unexpectedly).
ended() {
    if (($2 != 0)); then
        echo "--- containerd.log (last lines)"
        tail -n 80 "$CRI_ROOT/containerd.log"
    fi
    echo "=== $1 rc=$2"
}

husk=$repo/target/debug/husk
echo "=== containerd"
cri_config &&
    "$husk" install --config "$CRI_ROOT/config.toml" --bin-dir /usr/local/bin &&
    cri_launch
ended containerd $?
# husk doctor on a host that can run husk pods (L1: nested SVM, containerd with husk
# registered): every check passes (warnings allowed: L1's tmpfs is small).
echo "=== doctor"
"$husk" doctor --containerd-config "$CRI_ROOT/config.toml"
ended doctor $?
echo "=== runc"
steps runc false
ended runc $?

# leftovers: what a husk pod could leave behind once it is gone.
leftovers() {
    sleep 1
    echo "leftovers: vmm $(pgrep -c husk-vmm) shim $(pgrep -c -f containerd-shim-husk) run dirs $(find /run/husk/shim -mindepth 2 -maxdepth 2 2>/dev/null | wc -l) own layers $(find /run/husk/shim -name '*.layer' 2>/dev/null | wc -l) scratch $(find /var/lib/husk/scratch -type f 2>/dev/null | wc -l) rootfs mounts $(grep -c "$CRI_ROOT/state/.*/rootfs" /proc/mounts) pods $("${CRICTL[@]}" pods -q | wc -l) containers $("${CRICTL[@]}" ps -aq | wc -l) netns $(find /run/netns -mindepth 1 2>/dev/null | wc -l) taps $(ip -o link show | grep -c husk-tap) cgroups $(find /sys/fs/cgroup/k8s.io /sys/fs/cgroup/husk -mindepth 1 -type d 2>/dev/null | wc -l) uid leases $(find /run/husk/uids -type f 2>/dev/null | wc -l) virtiofsd $(pgrep -c -x virtiofsd)"
}


# The untrusted annotation selects husk: the pod is a microVM, and its container runs in it
# through every CRI step, timed like runc's above.
husk_containers() {
    local d pod ctr t0 t1 t2 t3 events
    d=$(mktemp -d)
    # containerd's events for this pod, to check what the shim published and in which order.
    ctr --address "$CRI_SOCK" events >"$d/events" 2>&1 &
    events=$!
    pod_json "$d/pod.json" pod-husk true
    container_json "$d/c.json" c-husk '["sh","-c","echo hello from the container; sleep 1000"]'
    t0=$(now)
    pod=$("${CRICTL[@]}" runp "$d/pod.json") || { tail -n 20 "$CRI_ROOT/containerd.log"; return 1; }
    t1=$(now)
    "${CRICTL[@]}" pods --id "$pod" -o json | grep -o '"state": *"[A-Z_]*"'
    echo "vmm processes: $(pgrep -c husk-vmm)"
    # The pod's shared directory: its virtiofsd, and the guest's driver up (status 15).
    echo "virtiofsd processes: $(pgrep -c -x virtiofsd)"
    echo "shared fs device: $("$repo/target/debug/husk" vmm --api "$(find /run/husk/shim -path "*/$pod/*" -name api.sock | head -1)" status | grep -o '"id":"fs-husk-shared","driver_status":[0-9]*')"
    ctr=$("${CRICTL[@]}" create "$pod" "$d/c.json" "$d/pod.json") || { tail -n 20 "$CRI_ROOT/containerd.log"; return 1; }
    "${CRICTL[@]}" start "$ctr" >/dev/null || return 1
    t2=$(now)
    wait_log "$ctr" hello
    t3=$(now)
    "${CRICTL[@]}" logs "$ctr"
    "${CRICTL[@]}" exec -s "$ctr" echo exec-ok || return 1
    echo "stdin through exec -i: $(printf 'one\ntwo\n' | "${CRICTL[@]}" exec -i "$ctr" cat | xargs)"
    # A terminal (script gives crictl a pty): the exec gets one, and crictl's size reaches it
    # (ResizePty comes just after the start: the shell waits for it).
    echo "exec -it: $(script -qec "stty rows 33 cols 111; ${CRICTL[*]} exec -it $ctr sh -c 'test -t 0 && test -t 1 && echo tty-ok; sleep 2; stty size'" /dev/null | tr -d '\r' | xargs)"
    "${CRICTL[@]}" update --memory 104857600 "$ctr" >/dev/null &&
        echo "memory.max after update: $("${CRICTL[@]}" exec -s "$ctr" cat /sys/fs/cgroup/memory.max)"
    local CTR=(ctr --address "$CRI_SOCK" -n k8s.io)
    "${CTR[@]}" task pause "$ctr" && echo "after pause: $("${CTR[@]}" task ls | awk -v id="$ctr" '$1 == id {print $3}')"
    "${CTR[@]}" task resume "$ctr" && echo "after resume: $("${CTR[@]}" task ls | awk -v id="$ctr" '$1 == id {print $3}')"
    echo "checkpoint: $("${CTR[@]}" task checkpoint "$ctr" 2>&1 | grep -o -e 'cannot checkpoint task' -e 'not implemented' | sort -u | xargs)"
    # L1 runs a kernel built from the same source: the boot id tells the VM's kernel apart.
    echo "boot id in the container: $("${CRICTL[@]}" exec -s "$ctr" cat /proc/sys/kernel/random/boot_id), in L1: $(cat /proc/sys/kernel/random/boot_id)"
    echo "processes in the container: $("${CRICTL[@]}" exec -s "$ctr" ps -o comm | tail -n +2 | sort | xargs)"
    echo "container hosts file: $("${CRICTL[@]}" exec -s "$ctr" cat /etc/hosts | grep -c localhost) localhost lines"
    "${CRICTL[@]}" inspect "$ctr" | grep -o '"state": *"[A-Z_]*"' | head -1
    echo "stats: $("${CRICTL[@]}" stats -o json --id "$ctr" | grep -A1 '"workingSetBytes"' | grep -o '"value": *"[0-9]*"')"
    # The shim's log lines carry the pod (and a container's, the container) as fields, and
    # name the pod's guest console, kept in its run directory while the pod runs.
    local mine console
    mine=$(grep -F "pod=\"$pod\"" "$CRI_ROOT/containerd.log")
    console=$(grep -o 'console="[^"]*"' <<<"$mine" | head -1 | cut -d'"' -f2)
    echo "shim log: $(grep -c . <<<"$mine") lines with the pod's field, $(grep -cF "container=\"$ctr\"" <<<"$mine") with the container's; the guest console $([[ -s $console ]] && echo "is $console, $(grep -cF "$ctr" "$console") lines of the agent's naming the container" || echo "missing: '$console'")"
    "${CRICTL[@]}" stop -t 2 "$ctr" >/dev/null || return 1
    "${CRICTL[@]}" inspect "$ctr" | grep -o '"state": *"[A-Z_]*"' | head -1
    "${CRICTL[@]}" rm "$ctr" >/dev/null && "${CRICTL[@]}" stopp "$pod" >/dev/null &&
        "${CRICTL[@]}" rmp "$pod" >/dev/null || return 1
    echo "timing husk: runp->ready $(ms "$t0" "$t1") ms, create+start $(ms "$t1" "$t2") ms, start->first log line $(ms "$t2" "$t3") ms"
    kill "$events"
    echo "container events: $(grep -F "\"$ctr\"" "$d/events" | grep -o ' /tasks/[a-z-]*' | xargs)"
    grep -o "container $ctr: .* image layers.*ms" "$CRI_ROOT/containerd.log" | head -1
    leftovers
    rm -rf "$d"
}
echo "=== husk"
husk_containers
ended husk $?

# A husk pod is on the pod network like a runc pod: its container sees eth0 with the IP CRI
# reports, the veth's MAC and MTU and the default route; it serves HTTP to a runc pod and
# fetches from it, reaches another husk pod and the bridge's gateway, and has the DNS
# settings given to runp. Afterwards no tap, qdisc or filter is left.
husk_network() {
    local d r h h2 rc hc hc2 rip hip hip2 ns gw
    d=$(mktemp -d)
    local serve='["sh","-c","mkdir -p /www && echo from-POD_NAME > /www/index.html && httpd -f -p 8080 -h /www"]'
    pod_json "$d/r.json" pod-net-runc false
    pod_json "$d/h.json" pod-net-husk true '{"servers": ["10.88.77.53"], "searches": ["husk.test"], "options": ["ndots:2"]}'
    pod_json "$d/h2.json" pod-net-husk2 true
    r=$("${CRICTL[@]}" runp "$d/r.json") || return 1
    h=$("${CRICTL[@]}" runp "$d/h.json") || { tail -n 20 "$CRI_ROOT/containerd.log"; return 1; }
    h2=$("${CRICTL[@]}" runp "$d/h2.json") || return 1
    container_json "$d/rc.json" c-net-runc "${serve//POD_NAME/runc}"
    container_json "$d/hc.json" c-net-husk "${serve//POD_NAME/husk}"
    container_json "$d/hc2.json" c-net-husk2 "${serve//POD_NAME/husk2}"
    rc=$("${CRICTL[@]}" create "$r" "$d/rc.json" "$d/r.json") && "${CRICTL[@]}" start "$rc" >/dev/null || return 1
    hc=$("${CRICTL[@]}" create "$h" "$d/hc.json" "$d/h.json") && "${CRICTL[@]}" start "$hc" >/dev/null || return 1
    hc2=$("${CRICTL[@]}" create "$h2" "$d/hc2.json" "$d/h2.json") && "${CRICTL[@]}" start "$hc2" >/dev/null || return 1
    rip=$(pod_ip "$r") hip=$(pod_ip "$h") hip2=$(pod_ip "$h2") ns=$(pod_netns "$h")
    echo "pod ips: runc $rip husk $hip husk2 $hip2 (netns $ns)"
    local X=("${CRICTL[@]}" exec -s "$hc")
    echo "husk eth0 inet: $("${X[@]}" ip -o -4 addr show eth0 | grep -o 'inet [0-9./]*')"
    echo "husk eth0 mac: $("${X[@]}" cat /sys/class/net/eth0/address) veth mac: $(ip netns exec "${ns##*/}" cat /sys/class/net/eth0/address)"
    echo "husk eth0 mtu: $("${X[@]}" cat /sys/class/net/eth0/mtu) veth mtu: $(ip netns exec "${ns##*/}" cat /sys/class/net/eth0/mtu)"
    gw=$("${X[@]}" ip route | grep -o 'default via [0-9.]*')
    echo "husk route: $gw (pod netns: $(ip netns exec "${ns##*/}" ip route | grep -o 'default via [0-9.]*'))"
    echo "husk resolv.conf: $("${X[@]}" cat /etc/resolv.conf | xargs)"
    # Dual stack: the IPv6 address CNI gave the pod, and the IPv6 default route.
    local rip6 hip6
    rip6=$(pod_ip6 "$r") hip6=$(pod_ip6 "$h")
    echo "pod ipv6: runc $rip6 husk $hip6"
    echo "husk eth0 inet6: $("${X[@]}" ip -o -6 addr show dev eth0 scope global | grep -o 'inet6 [0-9a-f:/]*')"
    echo "husk route6: $("${X[@]}" ip -6 route | grep -o 'default via [0-9a-f:]*') (pod netns: $(ip netns exec "${ns##*/}" ip -6 route | grep -o 'default via [0-9a-f:]*'))"
    # http_get CTR IP: the page CTR gets from IP:8080 (busybox-static's wget crashes in this
    # testbed, for runc too: a plain HTTP/1.0 request through nc).
    http_get() {
        local out
        out=$("${CRICTL[@]}" exec -s "$1" sh -c "printf 'GET / HTTP/1.0\r\n\r\n' | nc -w 5 $2 8080" 2>&1)
        grep -o 'from-[a-z0-9]*' <<<"$out" || echo "no page: $(tr '\r\n' '  ' <<<"$out")"
    }
    local i
    for ((i = 0; i < 50; i++)); do
        grep -q from-runc <<<"$(http_get "$hc" "$rip")" && break
        sleep 0.2
    done
    echo "husk -> runc: $(http_get "$hc" "$rip")"
    echo "runc -> husk: $(http_get "$rc" "$hip")"
    echo "husk -> husk2: $(http_get "$hc" "$hip2")"
    echo "husk -> runc (ipv6 ping): $("${X[@]}" ping -6 -c 1 -W 5 "$rip6" | grep -o '1 packets received')"
    echo "runc -> husk (ipv6 ping): $("${CRICTL[@]}" exec -s "$rc" ping -6 -c 1 -W 5 "$hip6" | grep -o '1 packets received')"
    echo "runc -> husk (ipv6 http): $(http_get "$rc" "$hip6")"
    echo "husk -> gateway: $("${X[@]}" ping -c 1 -W 5 "${gw##* }" | grep -o '1 packets received')"
    # Port forwarding (crictl port-forward, as kubectl port-forward): containerd connects to
    # localhost:PORT in the pod's network namespace, which husk forwards to the guest's
    # loopback; a server bound to the guest's 127.0.0.1 only is reached too, and a port
    # nothing listens on fails. runc's pod, through the same steps, for comparison.
    "${X[@]}" sh -c 'mkdir -p /lo && echo from-loopback > /lo/index.html && httpd -p 127.0.0.1:8081 -h /lo'
    forward_get() {
        local pf out i log=$d/pf-$2.log
        "${CRICTL[@]}" port-forward "$1" "$2:$3" >"$log" 2>&1 &
        pf=$!
        for ((i = 0; i < 100; i++)); do
            grep -q Forwarding "$log" && break
            sleep 0.2
        done
        out=$(timeout 30 bash -c "exec 3<>/dev/tcp/127.0.0.1/$2 && printf 'GET / HTTP/1.0\r\n\r\n' >&3 && cat <&3" 2>&1)
        kill "$pf" 2>/dev/null
        wait "$pf" 2>/dev/null
        grep -o 'from-[a-z0-9]*' <<<"$out" || echo "no page: $(tr '\r\n' '  ' <<<"$out" | head -c 200) (crictl: $(tr '\n' ' ' <"$log" | head -c 300))"
    }
    echo "port-forward runc 8080: $(forward_get "$r" 18080 8080)"
    echo "port-forward husk 8080: $(forward_get "$h" 18081 8080)"
    echo "port-forward husk loopback 8081: $(forward_get "$h" 18082 8081)"
    echo "port-forward husk closed port 9: $(forward_get "$h" 18083 9)"
    echo "tc in the pod netns: qdiscs $(ip netns exec "${ns##*/}" tc qdisc show | grep -c ingress) filters $(ip netns exec "${ns##*/}" tc filter show dev eth0 ingress | grep -c mirred) tap $(ip netns exec "${ns##*/}" ip -o link show | grep -c husk-tap0) forward rule $(ip netns exec "${ns##*/}" iptables -t nat -S OUTPUT | grep -c HUSK-PORT-FORWARD)"
    "${CRICTL[@]}" stop -t 1 "$rc" "$hc" "$hc2" >/dev/null
    "${CRICTL[@]}" rm "$rc" "$hc" "$hc2" >/dev/null
    "${CRICTL[@]}" stopp "$h" >/dev/null
    if [[ -e $ns ]]; then
        echo "after stopp, in the pod netns: qdiscs $(ip netns exec "${ns##*/}" tc qdisc show | grep -c ingress) tap $(ip netns exec "${ns##*/}" ip -o link show | grep -c husk-tap0) forward rule $(ip netns exec "${ns##*/}" iptables -t nat -S | grep -c HUSK-PORT-FORWARD)"
    else
        echo "after stopp, in the pod netns: qdiscs 0 tap 0 (netns gone)"
    fi
    "${CRICTL[@]}" stopp "$r" "$h2" >/dev/null && "${CRICTL[@]}" rmp "$r" "$h" "$h2" >/dev/null || return 1
    grep -o "pod $h: network wired in [0-9]* ms" "$CRI_ROOT/containerd.log" | head -1
    leftovers
    rm -rf "$d"
}
echo "=== husk_network"
husk_network
ended husk_network $?

# Two pods are two microVMs: different boot ids, neither sees the other's processes. SIGKILL
# to one VMM: its pod is reported not ready and its container exited, the other runs on, and
# both are removed without leftovers.
husk_two_pods() {
    local d p1 p2 c1 c2 vmm1
    d=$(mktemp -d)
    pod_json "$d/p1.json" pod-a true
    pod_json "$d/p2.json" pod-b true
    container_json "$d/c1.json" c-a '["sleep","1001"]'
    container_json "$d/c2.json" c-b '["sleep","1002"]'
    p1=$("${CRICTL[@]}" runp "$d/p1.json") && p2=$("${CRICTL[@]}" runp "$d/p2.json") || return 1
    c1=$("${CRICTL[@]}" create "$p1" "$d/c1.json" "$d/p1.json") && "${CRICTL[@]}" start "$c1" >/dev/null &&
        c2=$("${CRICTL[@]}" create "$p2" "$d/c2.json" "$d/p2.json") && "${CRICTL[@]}" start "$c2" >/dev/null || return 1
    echo "vmm processes: $(pgrep -c husk-vmm)"
    local b1 b2
    b1=$("${CRICTL[@]}" exec -s "$c1" cat /proc/sys/kernel/random/boot_id)
    b2=$("${CRICTL[@]}" exec -s "$c2" cat /proc/sys/kernel/random/boot_id)
    echo "boot ids: $b1 $b2 $([[ -n $b1 && $b1 != "$b2" ]] && echo differ || echo SAME)"
    echo "pod b sees: $("${CRICTL[@]}" exec -s "$c2" ps -o args | tail -n +2 | tr '\n' ' ')"
    vmm1=$(pgrep -f "husk-vmm.*/$p1/" | head -1)
    [[ -n $vmm1 ]] || { echo "no VMM found for pod $p1"; pgrep -af husk-vmm; return 1; }
    echo "pod a network before: $(netns_tc "$p1")"
    kill -KILL "$vmm1"
    wait_stopped 20 "$c1" "$p1"
    echo "pod a network after the VMM's SIGKILL: $(netns_tc "$p1")"
    echo "killed pod: $("${CRICTL[@]}" pods --id "$p1" -o json | grep -o 'SANDBOX_[A-Z]*' | head -1), its container: $("${CRICTL[@]}" inspect "$c1" | grep -o '"state": *"[A-Z_]*"' | head -1)"
    echo "other pod: $("${CRICTL[@]}" pods --id "$p2" -o json | grep -o 'SANDBOX_[A-Z]*' | head -1), its container: $("${CRICTL[@]}" inspect "$c2" | grep -o '"state": *"[A-Z_]*"' | head -1)"
    echo "vmm processes: $(pgrep -c husk-vmm)"
    "${CRICTL[@]}" stop -t 1 "$c2" >/dev/null || return 1
    for c in "$c1" "$c2"; do "${CRICTL[@]}" rm "$c" >/dev/null || return 1; done
    for p in "$p1" "$p2"; do
        "${CRICTL[@]}" stopp "$p" >/dev/null && "${CRICTL[@]}" rmp "$p" >/dev/null || return 1
    done
    leftovers
    rm -rf "$d"
}
echo "=== husk_two_pods"
husk_two_pods
ended husk_two_pods $?

# A container over its memory limit is OOM-killed in the guest, and CRI says so.
husk_oom() {
    local d p c events
    d=$(mktemp -d)
    ctr --address "$CRI_SOCK" events >"$d/events" 2>&1 &
    events=$!
    pod_json "$d/p.json" pod-oom true
    container_json "$d/c.json" c-oom '["dd","if=/dev/zero","of=/dev/null","bs=200M","count=1"]' \
        '"resources": {"memory_limit_in_bytes": 67108864}'
    p=$("${CRICTL[@]}" runp "$d/p.json") || return 1
    c=$("${CRICTL[@]}" create "$p" "$d/c.json" "$d/p.json") && "${CRICTL[@]}" start "$c" >/dev/null || return 1
    wait_stopped 30 "$c"
    "${CRICTL[@]}" inspect "$c" | grep -o -e '"state": *"[A-Z_]*"' -e '"reason": *"[A-Za-z]*"' -e '"exitCode": *[0-9]*' | head -3
    kill "$events"
    echo "container events: $(grep -F "\"$c\"" "$d/events" | grep -o ' /tasks/[a-z-]*' | xargs)"
    "${CRICTL[@]}" rm "$c" >/dev/null || return 1
    # A container whose program does not exist: start fails saying so, and its removal
    # leaves nothing (a layer in the VM) behind; the pod takes the next container.
    container_json "$d/bad.json" c-bad '["/no/such/program"]'
    c=$("${CRICTL[@]}" create "$p" "$d/bad.json" "$d/p.json") || return 1
    echo "bad start: $("${CRICTL[@]}" start "$c" 2>&1 | grep -o '/no/such/program.\{0,3\}: no such file or directory' | head -1)"
    echo "bad container: $("${CRICTL[@]}" inspect "$c" | grep -o -e '"state": *"[A-Z_]*"' -e '"exitCode": *[0-9]*' | head -2 | xargs)"
    "${CRICTL[@]}" rm "$c" >/dev/null || return 1
    echo "layers the VMM holds after rm: $(vmm_layers "$p")"
    container_json "$d/ok.json" c-ok '["echo","next container ok"]'
    c=$("${CRICTL[@]}" create "$p" "$d/ok.json" "$d/p.json") && "${CRICTL[@]}" start "$c" >/dev/null || return 1
    wait_log "$c" "next container ok" && echo "next container ok"
    wait_stopped 30 "$c"
    echo "next container: $("${CRICTL[@]}" inspect "$c" | grep -o -e '"state": *"[A-Z_]*"' -e '"exitCode": *[0-9]*' | head -2 | xargs)"
    "${CRICTL[@]}" rm "$c" >/dev/null && "${CRICTL[@]}" stopp "$p" >/dev/null && "${CRICTL[@]}" rmp "$p" >/dev/null || return 1
    leftovers
    rm -rf "$d"
}
echo "=== husk_oom"
husk_oom
ended husk_oom $?

# Image layers from the layer cache, stacked in the guest with overlayfs:
# - whiteouts and opaque directories behave as under runc;
# - a container's writes are seen by its exec, and not by a new container of the image;
# - a second pod of the image converts nothing, and the cache does not grow;
# - 32 containers run in one pod at once;
# - a damaged cache entry is rebuilt, never mounted;
# - an image removed and imported again with other content under its name shows the new one.
# shellcheck disable=SC2016 # $(...) in the containers' commands is their shell's
husk_layers() {
    local d p p2 r rc c c2 i ids n before after key show
    d=$(mktemp -d)
    mkdir -p "$d/l2/data" "$d/l2/opq" "$d/l3/data" "$d/l3/opq"
    echo keep >"$d/l2/data/keep"
    echo gone >"$d/l2/data/gone"
    echo lower >"$d/l2/opq/lower"
    : >"$d/l3/data/.wh.gone"
    : >"$d/l3/opq/.wh..wh..opq"
    echo upper >"$d/l3/opq/upper"
    oci_layers "$d/img" docker.io/husk/layers:1 '["/bin/sh"]' "$CRI_ROOT/images/busybox/root" "$d/l2" "$d/l3"
    ctr --address "$CRI_SOCK" -n k8s.io images import "$d/img/image.tar" >/dev/null || return 1
    show='["sh","-c","echo data: $(ls /data | xargs) opq: $(ls /opq | xargs) keep: $(cat /data/keep); echo x > /data/written; sleep 1000"]'
    pod_json "$d/r.json" pod-layers-runc false
    pod_json "$d/p.json" pod-layers true
    pod_json "$d/p2.json" pod-layers2 true
    IMAGE=docker.io/husk/layers:1 container_json "$d/c.json" c-layers "$show"
    IMAGE=docker.io/husk/layers:1 container_json "$d/c2.json" c-layers2 '["sh","-c","echo data: $(ls /data | xargs); sleep 1000"]'
    r=$("${CRICTL[@]}" runp "$d/r.json") && rc=$("${CRICTL[@]}" create "$r" "$d/c.json" "$d/r.json") &&
        "${CRICTL[@]}" start "$rc" >/dev/null || return 1
    p=$("${CRICTL[@]}" runp "$d/p.json") && c=$("${CRICTL[@]}" create "$p" "$d/c.json" "$d/p.json") &&
        "${CRICTL[@]}" start "$c" >/dev/null || return 1
    wait_log "$rc" "data:" && wait_log "$c" "data:" || return 1
    echo "runc sees: $("${CRICTL[@]}" logs "$rc" 2>&1 | head -1)"
    echo "husk sees: $("${CRICTL[@]}" logs "$c" 2>&1 | head -1)"
    echo "husk exec sees the write: $("${CRICTL[@]}" exec -s "$c" cat /data/written)"
    c2=$("${CRICTL[@]}" create "$p" "$d/c2.json" "$d/p.json") && "${CRICTL[@]}" start "$c2" >/dev/null || return 1
    wait_log "$c2" "data:" || return 1
    echo "a new container sees: $("${CRICTL[@]}" logs "$c2" 2>&1 | head -1)"
    grep -o "container $c: .* image layers.*ms" "$CRI_ROOT/containerd.log" | head -1
    before=$(du -sb /var/lib/husk/layers | cut -f1)
    p2=$("${CRICTL[@]}" runp "$d/p2.json") || return 1
    c=$("${CRICTL[@]}" create "$p2" "$d/c.json" "$d/p2.json") && "${CRICTL[@]}" start "$c" >/dev/null || return 1
    after=$(du -sb /var/lib/husk/layers | cut -f1)
    echo "second pod: $(grep -o "container $c: [0-9]* image layers ([0-9]* from the cache, [0-9]* converted)" "$CRI_ROOT/containerd.log" | head -1 | cut -d' ' -f3-)"
    echo "layer cache bytes: before the second pod $before after $after"
    # 32 containers at once in the second pod (with c: 33).
    container_json "$d/s.json" c-many '["sleep","1000"]'
    ids=()
    for ((i = 0; i < 32; i++)); do
        sed "s/c-many/c-many-$i/" "$d/s.json" >"$d/s$i.json"
        if ! n=$("${CRICTL[@]}" create "$p2" "$d/s$i.json" "$d/p2.json") ||
            ! "${CRICTL[@]}" start "$n" >/dev/null; then
            echo "container $i did not start"
            tail -n 5 "$CRI_ROOT/containerd.log"
            break
        fi
        ids+=("$n")
    done
    echo "running in the second pod: $("${CRICTL[@]}" ps -q --pod "$p2" --state running | wc -l)"
    echo "layers its VMM holds: $(vmm_layers "$p2")"
    "${CRICTL[@]}" stop -t 1 "${ids[@]}" >/dev/null && "${CRICTL[@]}" rm "${ids[@]}" >/dev/null || return 1
    echo "layers its VMM holds after rm: $(vmm_layers "$p2")"
    "${CRICTL[@]}" stop -t 1 "$c" "$c2" "$rc" >/dev/null
    "${CRICTL[@]}" rm "$c" "$c2" "$rc" >/dev/null
    "${CRICTL[@]}" stopp "$p" "$p2" "$r" >/dev/null && "${CRICTL[@]}" rmp "$p" "$p2" "$r" >/dev/null || return 1
    # Damaged cache entries (every one truncated) are rebuilt before a new pod uses them.
    for key in /var/lib/husk/layers/*.img; do truncate -s 4096 "$key"; done
    container_json "$d/b.json" c-rebuilt '["sh","-c","echo rebuilt: $(ls /bin | wc -l); sleep 1000"]'
    pod_json "$d/p3.json" pod-layers3 true
    p=$("${CRICTL[@]}" runp "$d/p3.json") && n=$("${CRICTL[@]}" create "$p" "$d/b.json" "$d/p3.json") &&
        "${CRICTL[@]}" start "$n" >/dev/null || return 1
    wait_log "$n" "rebuilt:" && echo "after truncating the cache entries: $("${CRICTL[@]}" logs "$n" 2>&1 | head -1 | grep -c 'rebuilt: [1-9]') container ran, $(grep -c 'rebuilding it' "$CRI_ROOT/containerd.log") rebuilt"
    "${CRICTL[@]}" stop -t 1 "$n" >/dev/null && "${CRICTL[@]}" rm "$n" >/dev/null &&
        "${CRICTL[@]}" stopp "$p" >/dev/null && "${CRICTL[@]}" rmp "$p" >/dev/null || return 1
    # The image removed and imported again under its name with other content.
    "${CRICTL[@]}" rmi docker.io/husk/layers:1 >/dev/null || return 1
    echo keep-v2 >"$d/l2/data/keep"
    rm -rf "$d/img"
    oci_layers "$d/img" docker.io/husk/layers:1 '["/bin/sh"]' "$CRI_ROOT/images/busybox/root" "$d/l2" "$d/l3"
    ctr --address "$CRI_SOCK" -n k8s.io images import "$d/img/image.tar" >/dev/null || return 1
    # (A pod of another name: the first one's log directory still holds c-layers.log.)
    pod_json "$d/p4.json" pod-layers4 true
    p=$("${CRICTL[@]}" runp "$d/p4.json") && c=$("${CRICTL[@]}" create "$p" "$d/c.json" "$d/p4.json") &&
        "${CRICTL[@]}" start "$c" >/dev/null || return 1
    wait_log "$c" "data:" && echo "after the image changed: $("${CRICTL[@]}" logs "$c" 2>&1 | head -1)"
    echo "its layers: $(grep -o "container $c: [0-9]* image layers ([0-9]* from the cache, [0-9]* converted)" "$CRI_ROOT/containerd.log" | head -1 | cut -d' ' -f3-)"
    "${CRICTL[@]}" stop -t 1 "$c" >/dev/null && "${CRICTL[@]}" rm "$c" >/dev/null &&
        "${CRICTL[@]}" stopp "$p" >/dev/null && "${CRICTL[@]}" rmp "$p" >/dev/null || return 1
    "${CRICTL[@]}" rmi docker.io/husk/layers:1 >/dev/null
    leftovers
    rm -rf "$d"
}
echo "=== husk_layers"
husk_layers
ended husk_layers $?

# A privileged container runs (all capabilities, /sys writable, the guest's devices and not
# the host's); the pod's sysctls are set in the guest; a pod that shares its processes has
# one PID namespace whose PID 1 is its pause; a sysctl the guest kernel lacks fails runp,
# naming it, and leaves nothing.
husk_security() {
    local d p c
    d=$(mktemp -d)
    POD_LINUX='"security_context": {"privileged": true}, "sysctls": {"kernel.shm_rmid_forced": "1", "net.ipv4.ip_unprivileged_port_start": "100"}' \
        pod_json "$d/p.json" pod-priv true
    # shellcheck disable=SC2016 # expanded by the container's shell
    container_json "$d/c.json" c-priv '["sh","-c","echo caps: $(grep CapEff /proc/self/status | cut -f2); mount -o remount,rw /sys && echo sys: rw; echo kvm: $(ls /dev/kvm 2>&1 | grep -c No); echo sysctls: $(cat /proc/sys/kernel/shm_rmid_forced /proc/sys/net/ipv4/ip_unprivileged_port_start); sleep 1000"]' \
        '"security_context": {"privileged": true}'
    p=$("${CRICTL[@]}" runp "$d/p.json") || { tail -n 20 "$CRI_ROOT/containerd.log"; return 1; }
    if ! c=$("${CRICTL[@]}" create "$p" "$d/c.json" "$d/p.json") || ! "${CRICTL[@]}" start "$c" >/dev/null; then
        tail -n 20 "$CRI_ROOT/containerd.log"
        return 1
    fi
    wait_log "$c" "sysctls:"
    "${CRICTL[@]}" logs "$c" 2>&1 | grep -E '^(caps|sys|kvm|sysctls):'
    "${CRICTL[@]}" stop -t 1 "$c" >/dev/null && "${CRICTL[@]}" rm "$c" >/dev/null &&
        "${CRICTL[@]}" stopp "$p" >/dev/null && "${CRICTL[@]}" rmp "$p" >/dev/null || return 1
    # shareProcessNamespace: the pod's containers in one PID namespace, the pause PID 1.
    POD_LINUX='"security_context": {"namespace_options": {"pid": 0}}' pod_json "$d/s.json" pod-sharedpid true
    container_json "$d/s1.json" c-shared1 '["sleep","1001"]' '"security_context": {"namespace_options": {"pid": 0}}'
    container_json "$d/s2.json" c-shared2 '["sleep","1002"]' '"security_context": {"namespace_options": {"pid": 0}}'
    p=$("${CRICTL[@]}" runp "$d/s.json") || return 1
    c=$("${CRICTL[@]}" create "$p" "$d/s1.json" "$d/s.json") && "${CRICTL[@]}" start "$c" >/dev/null || return 1
    local c2
    c2=$("${CRICTL[@]}" create "$p" "$d/s2.json" "$d/s.json") && "${CRICTL[@]}" start "$c2" >/dev/null || return 1
    echo "shared pid namespace: $("${CRICTL[@]}" exec -s "$c2" ps -o pid,args 2>&1 | sed 's/  */ /g' | xargs)"
    "${CRICTL[@]}" stop -t 1 "$c" "$c2" >/dev/null && "${CRICTL[@]}" rm "$c" "$c2" >/dev/null &&
        "${CRICTL[@]}" stopp "$p" >/dev/null && "${CRICTL[@]}" rmp "$p" >/dev/null || return 1
    POD_LINUX='"sysctls": {"kernel.husk_no_such_setting": "1"}' pod_json "$d/bad.json" pod-badsysctl true
    echo "bad sysctl: $("${CRICTL[@]}" runp "$d/bad.json" 2>&1 | grep -o 'sysctl kernel.husk_no_such_setting: [a-z ]*' | head -1)"
    "${CRICTL[@]}" pods -q --name pod-badsysctl | xargs -r "${CRICTL[@]}" rmp -f >/dev/null
    leftovers
    rm -rf "$d"
}
echo "=== husk_security"
husk_security
ended husk_security $?

# Volumes are shared live (virtio-fs): a host write after the start is read in the
# container and a container's write on the host; two containers of the pod sharing a
# directory see each other's writes; a read-only volume refuses writes (EROFS), even after a
# privileged container remounts it read-write, and shows the host's updates; CRI's
# /etc/hosts comes through the share. Escapes fail: a symlink in the volume to a host
# directory, `..` walks, the share mounted whole from a privileged container, and forged
# file handles (tests/helpers/handle-escape.c) reach no host file outside the share. The
# host's mount table never holds the volumes; rmp, and a killed VMM, leave the host's files
# and nothing else.
husk_volumes() {
    local d p c1 c2 vfs
    d=$(mktemp -d)
    mkdir -p "$d/vol" "$d/ro" "$d/secret"
    echo HUSK-HOST-SECRET >"$d/secret/husk-secret-marker"
    echo v1 >"$d/ro/config"
    ln -s "$d/secret" "$d/vol/escape"
    cp "$repo/target/handle-escape" "$d/vol/handle-escape"
    POD_LINUX='"security_context": {"privileged": true}' pod_json "$d/p.json" pod-vol true
    cat >"$d/c1.json" <<EOF
{"metadata": {"name": "c-vol1"}, "image": {"image": "docker.io/husk/busybox:1"},
 "command": ["sleep", "1000"], "log_path": "c-vol1.log",
 "mounts": [{"container_path": "/vol", "host_path": "$d/vol"},
            {"container_path": "/ro", "host_path": "$d/ro", "readonly": true}],
 "linux": {"security_context": {"privileged": true}}}
EOF
    cat >"$d/c2.json" <<EOF
{"metadata": {"name": "c-vol2"}, "image": {"image": "docker.io/husk/busybox:1"},
 "command": ["sleep", "1000"], "log_path": "c-vol2.log",
 "mounts": [{"container_path": "/shared", "host_path": "$d/vol"}]}
EOF
    p=$("${CRICTL[@]}" runp "$d/p.json") || { tail -n 20 "$CRI_ROOT/containerd.log"; return 1; }
    if ! c1=$("${CRICTL[@]}" create "$p" "$d/c1.json" "$d/p.json") || ! "${CRICTL[@]}" start "$c1" >/dev/null ||
        ! c2=$("${CRICTL[@]}" create "$p" "$d/c2.json" "$d/p.json") || ! "${CRICTL[@]}" start "$c2" >/dev/null; then
        tail -n 20 "$CRI_ROOT/containerd.log"
        return 1
    fi
    local X1=("${CRICTL[@]}" exec -s "$c1") X2=("${CRICTL[@]}" exec -s "$c2")
    echo from-host >"$d/vol/host-file"
    echo "host to container: $("${X1[@]}" cat /vol/host-file 2>&1)"
    "${X1[@]}" sh -c 'echo from-c1 >/vol/c1-file'
    echo "container to host: $(cat "$d/vol/c1-file")"
    echo "c1 to c2: $("${X2[@]}" cat /shared/c1-file 2>&1)"
    "${X2[@]}" sh -c 'echo from-c2 >/shared/c2-file'
    echo "c2 to c1: $("${X1[@]}" cat /vol/c2-file 2>&1)"
    echo "read-only: $("${X1[@]}" sh -c 'touch /ro/x' 2>&1 | grep -o 'Read-only file system')"
    echo "read-only after a remount rw: $("${X1[@]}" sh -c 'mount -o remount,rw /ro && echo x >/ro/config' 2>&1 | grep -o 'Read-only file system')"
    echo v2 >"$d/ro/config"
    sleep 2
    echo "read-only volume updated on the host: $("${X1[@]}" cat /ro/config 2>&1)"
    # shellcheck disable=SC2016 # awk's fields
    echo "hosts file through the share: $("${X1[@]}" awk '$5 == "/etc/hosts" {for (i = 7; i <= NF; i++) if ($i == "-") print $(i + 1)}' /proc/self/mountinfo)"
    # Escapes.
    echo "symlink to the host: $("${X1[@]}" cat /vol/escape/husk-secret-marker 2>&1 | grep -o -e HUSK-HOST-SECRET -e 'No such file or directory')"
    echo "dot-dot walk: $("${X1[@]}" cat "/vol/../../../../..$d/secret/husk-secret-marker" 2>&1 | grep -o -e HUSK-HOST-SECRET -e 'No such file or directory')"
    echo "the share mounted whole: $("${X1[@]}" sh -c 'mkdir -p /mnt/share && mount -t virtiofs husk-shared /mnt/share && echo mounted; grep -rs HUSK-HOST-SECRET /mnt/share/ /mnt/share/../ | grep -c .; true' 2>&1 | xargs)"
    "${X1[@]}" /vol/handle-escape /vol husk-secret-marker 2>&1
    "${X1[@]}" /vol/handle-escape /mnt/share husk-secret-marker 2>&1
    echo "host mount table: $(grep -c -e "$d" -e /shared/ /proc/self/mountinfo) volume mounts"
    vfs=$(pgrep -x virtiofsd | head -1)
    echo "virtiofsd's namespace: $(awk '{print $5}' "/proc/$vfs/mountinfo" | grep -c "^/$c1/")+$(awk '{print $5}' "/proc/$vfs/mountinfo" | grep -c "^/$c2/") volume mounts"
    "${CRICTL[@]}" stop -t 1 "$c1" "$c2" >/dev/null && "${CRICTL[@]}" rm "$c1" "$c2" >/dev/null &&
        "${CRICTL[@]}" stopp "$p" >/dev/null && "${CRICTL[@]}" rmp "$p" >/dev/null || return 1
    echo "host files after rmp: $(find "$d/vol" -mindepth 1 -printf '%f\n' | sort | xargs)"
    leftovers
    # A killed VMM: virtiofsd goes with it, and its mounts with its namespace.
    pod_json "$d/k.json" pod-vol-kill true
    p=$("${CRICTL[@]}" runp "$d/k.json") || return 1
    c1=$("${CRICTL[@]}" create "$p" "$d/c2.json" "$d/k.json") && "${CRICTL[@]}" start "$c1" >/dev/null || return 1
    pkill -KILL -f "husk-vmm.*/$p/"
    wait_stopped 30 "$c1" "$p"
    sleep 1
    echo "after the VMM's SIGKILL: virtiofsd $(pgrep -c -x virtiofsd)"
    "${CRICTL[@]}" rm "$c1" >/dev/null && "${CRICTL[@]}" stopp "$p" >/dev/null && "${CRICTL[@]}" rmp "$p" >/dev/null || return 1
    echo "host files after the kill: $(find "$d/vol" -mindepth 1 -printf '%f\n' | sort | xargs)"
    leftovers
    rm -rf "$d"
}
echo "=== husk_volumes"
husk_volumes
ended husk_volumes $?

# containerd restarts: the pod's shim and VM live on, containerd reconnects to them, the
# container still runs and takes execs, and the pod still stops and goes.
husk_restart() {
    local d p c vmm
    d=$(mktemp -d)
    pod_json "$d/p.json" pod-r true
    container_json "$d/c.json" c-r '["sleep","1000"]'
    p=$("${CRICTL[@]}" runp "$d/p.json") || return 1
    c=$("${CRICTL[@]}" create "$p" "$d/c.json" "$d/p.json") && "${CRICTL[@]}" start "$c" >/dev/null || return 1
    vmm=$(pgrep -f "husk-vmm.*/$p/" | head -1)
    cri_restart || { echo "containerd did not come back"; return 1; }
    echo "after restart: $("${CRICTL[@]}" pods --id "$p" -o json | grep -o 'SANDBOX_[A-Z]*' | head -1), same vmm $(kill -0 "$vmm" 2>/dev/null && echo yes || echo no)"
    "${CRICTL[@]}" exec -s "$c" echo still-running
    "${CRICTL[@]}" stop -t 1 "$c" >/dev/null && "${CRICTL[@]}" rm "$c" >/dev/null &&
        "${CRICTL[@]}" stopp "$p" >/dev/null && "${CRICTL[@]}" rmp "$p" >/dev/null || return 1
    leftovers
    rm -rf "$d"
}
echo "=== husk_restart"
husk_restart
ended husk_restart $?

# The pod's shim is SIGKILLed: its VMM dies with it, containerd reports the pod and its
# container stopped, and removing them leaves nothing (containerd's `shim delete` cleans up).
husk_shim_killed() {
    local d p c shim
    d=$(mktemp -d)
    pod_json "$d/p.json" pod-k true
    container_json "$d/c.json" c-k '["sleep","1000"]'
    p=$("${CRICTL[@]}" runp "$d/p.json") || return 1
    c=$("${CRICTL[@]}" create "$p" "$d/c.json" "$d/p.json") && "${CRICTL[@]}" start "$c" >/dev/null || return 1
    shim=$(pgrep -f "containerd-shim-husk-v2 .*-id $p" | head -1)
    [[ -n $shim ]] || { echo "no shim found for pod $p"; pgrep -af containerd-shim; return 1; }
    echo "network before: $(netns_tc "$p")"
    kill -KILL "$shim"
    wait_stopped 30 "$c" "$p"
    echo "network after the shim's SIGKILL: $(netns_tc "$p")"
    echo "after the shim's SIGKILL: $("${CRICTL[@]}" pods --id "$p" -o json | grep -o 'SANDBOX_[A-Z]*' | head -1), container $("${CRICTL[@]}" inspect "$c" | grep -o 'CONTAINER_[A-Z]*' | head -1), vmm $(pgrep -c husk-vmm)"
    "${CRICTL[@]}" rm "$c" >/dev/null && "${CRICTL[@]}" stopp "$p" >/dev/null && "${CRICTL[@]}" rmp "$p" >/dev/null || return 1
    leftovers
    rm -rf "$d"
}
echo "=== husk_shim_killed"
husk_shim_killed
ended husk_shim_killed $?

# The VMM is confined: every one of its threads runs under a seccomp filter, and a thread
# that makes a syscall outside its filter kills the VMM (SIGSYS). A VMM built with the test
# trigger (target/seccomp-trigger, built by tests/tests/cri.rs; never a release) is made to
# break its filter on the I/O thread and on a vCPU thread: each pod is reported not ready, its
# container exited, the shim's log names the cause, and nothing is left.
husk_confined() {
    local d p c vmm kind
    d=$(mktemp -d)
    pod_json "$d/p.json" pod-confined true
    container_json "$d/c.json" c-confined '["sleep","1000"]'
    p=$("${CRICTL[@]}" runp "$d/p.json") || return 1
    c=$("${CRICTL[@]}" create "$p" "$d/c.json" "$d/p.json") && "${CRICTL[@]}" start "$c" >/dev/null || return 1
    vmm=$(pgrep -f "husk-vmm.*/$p/" | head -1)
    [[ -n $vmm ]] || { echo "no VMM found for pod $p"; return 1; }
    echo "vmm threads: $(find "/proc/$vmm/task" -mindepth 1 -maxdepth 1 | wc -l) filtered: $(grep -l '^Seccomp:[[:space:]]*2' /proc/"$vmm"/task/*/status | wc -l) ($(cat /proc/"$vmm"/task/*/comm | sort | xargs))"
    echo "vmm NoNewPrivs: $(awk '/^NoNewPrivs:/ {print $2}' "/proc/$vmm/status")"
    # Jailed: a user of its own, no capabilities on any thread, a root holding only its
    # sockets, no namespace shared with the host, rlimits.
    echo "vmm user: uid $(awk '/^Uid:/ {print $2}' "/proc/$vmm/status") gid $(awk '/^Gid:/ {print $2}' "/proc/$vmm/status") groups [$(awk '/^Groups:/ {$1 = ""; print}' "/proc/$vmm/status" | xargs)]"
    echo "vmm capabilities: $(cat /proc/"$vmm"/task/*/status | grep -E '^Cap(Inh|Prm|Eff|Bnd|Amb):' | sort -u | xargs)"
    echo "vmm root: $(find "/proc/$vmm/root/" -mindepth 1 -maxdepth 1 -printf '%f\n' | sort | xargs)"
    echo "vmm root mount: $(awk '$5 == "/" {print $6}' "/proc/$vmm/mountinfo") ($(wc -l <"/proc/$vmm/mountinfo") mounts)"
    echo "vmm lease: $([[ -f /run/husk/uids/$(awk '/^Uid:/ {print $2}' "/proc/$vmm/status") ]] && echo held)"
    local ns shared=()
    for ns in mnt ipc uts net pid; do
        [[ $(readlink "/proc/$vmm/ns/$ns") == "$(readlink "/proc/1/ns/$ns")" ]] && shared+=("$ns")
    done
    echo "vmm namespaces shared with the host: ${shared[*]:-none}"
    echo "vmm limits: open files $(awk '/^Max open files/ {print $4, $5}' "/proc/$vmm/limits") file size $(awk '/^Max file size/ {print $4, $5}' "/proc/$vmm/limits")"
    # PID 1 of a PID namespace of its own, in its own cgroup with limits.
    echo "vmm NSpid: $(awk '/^NSpid:/ {print $3}' "/proc/$vmm/status")"
    local cg
    cg=$(sed -n 's/^0:://p' "/proc/$vmm/cgroup")
    echo "vmm cgroup: $([[ $cg == */$p ]] && echo "the pod's" || echo "$cg") memory.max $(cat "/sys/fs/cgroup$cg/memory.max") pids.max $(cat "/sys/fs/cgroup$cg/pids.max") procs $(wc -l <"/sys/fs/cgroup$cg/cgroup.procs")"
    "${CRICTL[@]}" exec -s "$c" echo exec-under-seccomp
    "${CRICTL[@]}" stop -t 1 "$c" >/dev/null && "${CRICTL[@]}" rm "$c" >/dev/null &&
        "${CRICTL[@]}" stopp "$p" >/dev/null && "${CRICTL[@]}" rmp "$p" >/dev/null || return 1
    # husk install's config (the installed guest image) with the trigger's VMM added.
    cp /etc/husk/config.toml "$d/husk-config"
    printf '\n[vmm]\npath = "%s"\n' "$repo/target/seccomp-trigger/debug/husk-vmm" >>/etc/husk/config.toml
    local rc=0
    for kind in io vcpu; do
        seccomp_trigger "$d" "$kind" || rc=1
    done
    cp "$d/husk-config" /etc/husk/config.toml
    leftovers
    rm -rf "$d"
    return $rc
}
# seccomp_trigger DIR KIND: a pod whose VMM's KIND thread breaks its filter, then removed.
seccomp_trigger() {
    local p c sock
    pod_json "$1/t.json" "pod-trigger-$2" true
    container_json "$1/tc.json" "c-trigger-$2" '["sleep","1000"]'
    p=$("${CRICTL[@]}" runp "$1/t.json") || return 1
    c=$("${CRICTL[@]}" create "$p" "$1/tc.json" "$1/t.json") && "${CRICTL[@]}" start "$c" >/dev/null || return 1
    sock=$(find /run/husk/shim -path "*/$p/*" -name api.sock | head -1)
    python3 -c 'import socket, sys
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])
s.sendall(("{\"seccomp_trigger\":\"%s\"}\n" % sys.argv[2]).encode()); s.recv(100)' "$sock" "$2" 2>/dev/null
    wait_stopped 30 "$c" "$p"
    # The shim logs why before the sandbox exits, but containerd copies the shim's log into
    # its own a moment later.
    local i
    for ((i = 0; i < 50; i++)); do
        grep -q "pod $p: the VMM was killed by its seccomp filter" "$CRI_ROOT/containerd.log" && break
        sleep 0.1
    done
    echo "trigger $2: pod $("${CRICTL[@]}" pods --id "$p" -o json | grep -o 'SANDBOX_[A-Z]*' | head -1), container $("${CRICTL[@]}" inspect "$c" | grep -o 'CONTAINER_[A-Z]*' | head -1), shim log:$(grep -o "pod $p: the VMM was killed by its seccomp filter (SIGSYS)" "$CRI_ROOT/containerd.log" | head -1 | cut -d: -f2-)"
    "${CRICTL[@]}" rm "$c" >/dev/null && "${CRICTL[@]}" stopp "$p" >/dev/null && "${CRICTL[@]}" rmp "$p" >/dev/null
}
echo "=== husk_confined"
husk_confined
ended husk_confined $?

# A hostNetwork pod cannot be a VM: runp fails saying so, and leaves nothing.
echo "=== husk_host_network"
d=$(mktemp -d)
cat >"$d/pod.json" <<EOF
{"metadata": {"name": "pod-hostnet", "namespace": "default", "uid": "pod-hostnet-uid", "attempt": 0},
 "log_directory": "$CRI_ROOT/logs/pod-hostnet",
 "linux": {"security_context": {"namespace_options": {"network": 2}}}}
EOF
# (containerd itself refuses the untrusted annotation with host access: the husk runtime
# class asks the shim.)
out=$("${CRICTL[@]}" runp --runtime husk "$d/pod.json" 2>&1)
grep -o "a VM cannot share the host's network namespace" <<<"$out" || echo "runp said: $out"
"${CRICTL[@]}" pods -q | xargs -r "${CRICTL[@]}" rmp -f >/dev/null 2>&1
leftovers
rm -rf "$d"
echo "=== husk_host_network rc=0"

# husk monitor's endpoint while two husk pods run: both pods' series, with plausible values
# (the VMM's resident memory at least what the guest uses, vCPU time growing while a container
# works, exits and vsock bytes counted, the agent answering, each container's stats).
husk_metrics() {
    local d i p c mon rc=0 ids=() ctrs=()
    d=$(mktemp -d)
    "$husk" monitor --listen 127.0.0.1:9449 2>"$d/monitor.log" &
    mon=$!
    for i in 1 2; do
        pod_json "$d/p$i.json" "metrics-$i" true
        container_json "$d/c$i.json" "metrics-$i" '["sleep","1000"]'
        p=$("${CRICTL[@]}" runp "$d/p$i.json") && c=$("${CRICTL[@]}" create "$p" "$d/c$i.json" "$d/p$i.json") &&
            "${CRICTL[@]}" start "$c" >/dev/null || rc=1
        ids+=("$p")
        ctrs+=("$c")
    done
    curl -sf http://127.0.0.1:9449/metrics >"$d/one" || { echo "no scrape: $(cat "$d/monitor.log")"; rc=1; }
    for i in 0 1; do
        # Work in the container, so its vCPU has something to do between the scrapes.
        # shellcheck disable=SC2016 # the container's shell expands it
        "${CRICTL[@]}" exec -s "${ctrs[$i]}" sh -c 'i=0; while [ $i -lt 30000 ]; do i=$((i+1)); done'
    done
    curl -sf http://127.0.0.1:9449/metrics >"$d/two" || rc=1
    echo "pods in the scrape: $(awk '$1 == "husk_pods" {print $2}' "$d/two")"
    for i in 0 1; do
        p=${ids[$i]} c=${ctrs[$i]}
        local used rss v1 v2 sel="sandbox_id=\"$p\""
        # The guest's memory in use (its meminfo, which the container sees).
        used=$("${CRICTL[@]}" exec -s "$c" cat /proc/meminfo | awk '/^MemTotal/ {t = $2} /^MemFree/ {f = $2} END {print (t - f) * 1024}')
        rss=$(grep -F "$sel" "$d/two" | grep '^husk_pod_process_memory_rss_bytes' | grep -F 'process="vmm"' | awk '{print $2}')
        v1=$(grep -F "$sel" "$d/one" | grep '^husk_pod_vcpu_seconds_total' | awk '{s += $2} END {print s}')
        v2=$(grep -F "$sel" "$d/two" | grep '^husk_pod_vcpu_seconds_total' | awk '{s += $2} END {print s}')
        echo "pod $i: series $(grep -cF "$sel" "$d/two"), info $(grep -F "$sel" "$d/two" | grep -c '^husk_pod_info{')," \
            "vmm rss $rss guest used $used: $(awk -v r="$rss" -v u="$used" 'BEGIN {print (r + 0 >= u + 0 && u > 0) ? "rss covers the guest" : "RSS BELOW THE GUEST"}')," \
            "vcpu seconds $v1 -> $v2: $(awk -v a="$v1" -v b="$v2" 'BEGIN {print (b > a) ? "grew" : "DID NOT GROW"}')," \
            "io exits $(grep -F "$sel" "$d/two" | grep '^husk_pod_vm_exits_total' | grep -F 'kind="io"' | awk '{s += $2} END {print s + 0}')," \
            "vsock bytes to the guest $(grep -F "$sel" "$d/two" | grep '^husk_pod_device_bytes_total' | grep -F 'device="vsock"' | grep -F 'to_guest' | awk '{print $2 + 0}')," \
            "agent up $(grep -F "$sel" "$d/two" | grep '^husk_pod_agent_up' | awk '{print $2}')," \
            "boot seconds $(grep -F "$sel" "$d/two" | grep '^husk_pod_boot_seconds' | awk '{print $2 + 0}')," \
            "rpc latency seconds $(grep -F "$sel" "$d/two" | grep '^husk_pod_agent_rpc_latency_seconds' | awk '{print $2 + 0}')," \
            "labels $(grep -F "$sel" "$d/two" | grep '^husk_pod_info{' | grep -o 'pod="[^"]*",namespace="[^"]*"')," \ \
            "container memory $(grep -F "$sel" "$d/two" | grep '^husk_container_memory_usage_bytes' | grep -cF "container=\"$c\"") series"
    done
    grep -F "sandbox_id=\"${ids[0]}\"" "$d/two" | grep -v '^#' | cut -c1-200 | sed 's/^/    | /' | head -40
    kill "$mon"
    wait "$mon" 2>/dev/null
    "${CRICTL[@]}" pods -q | xargs -r "${CRICTL[@]}" stopp >/dev/null
    "${CRICTL[@]}" pods -q | xargs -r "${CRICTL[@]}" rmp -f >/dev/null
    leftovers
    rm -rf "$d"
    return $rc
}
echo "=== husk_metrics"
husk_metrics
ended husk_metrics $?

# husk as installed, alone: husk install put husk, the shim, husk-vmm, the guest image and
# husk's config in system paths (the containerd section); with the build tree and what the
# build cache holds of husk (the guest image, kernels, the agent's build) hidden under empty
# tmpfs mounts, a pod still runs a container and an exec. (The cache's tools stay: crictl.)
husk_standalone() {
    local d p c rc=0 cache=${HUSK_CACHE:-/var/cache/husk} hidden=() m n=0
    d=$(mktemp -d)
    for m in "$repo/target" "$cache"/{current,kernel,initramfs,cargo-target,build}; do
        [[ -d $m ]] || continue
        mount -t tmpfs -o size=1m tmpfs "$m" || { rc=1; break; }
        hidden+=("$m")
        n=$((n + $(find "$m" -mindepth 1 | wc -l)))
    done
    if ((rc)); then
        umount "${hidden[@]}"
        return 1
    fi
    echo "hidden: $(for m in "${hidden[@]}"; do printf '%s ' "${m##*/}"; done)(entries left in them: $n)"
    echo "installed config: $(grep -E '^(kernel|initramfs)' /etc/husk/config.toml | paste -sd ' ')"
    /usr/local/bin/husk doctor --containerd-config "$CRI_ROOT/config.toml" | grep -E "^(ok|FAIL) +(shim|vmm|guest kernel|guest image|runtime class):"
    pod_json "$d/pod.json" standalone true
    container_json "$d/c.json" standalone '["sh","-c","echo standalone-ok; sleep 1000"]'
    if p=$("${CRICTL[@]}" runp "$d/pod.json") && c=$("${CRICTL[@]}" create "$p" "$d/c.json" "$d/pod.json") &&
        "${CRICTL[@]}" start "$c" >/dev/null && wait_log "$c" standalone-ok; then
        "${CRICTL[@]}" logs "$c"
        "${CRICTL[@]}" exec -s "$c" echo exec-standalone
        echo "vmm: $(pgrep -a husk-vmm | awk '{print $2}' | sort -u)"
    else
        rc=1
    fi
    "${CRICTL[@]}" pods -q | xargs -r "${CRICTL[@]}" stopp >/dev/null
    "${CRICTL[@]}" pods -q | xargs -r "${CRICTL[@]}" rmp -f >/dev/null
    umount "${hidden[@]}" || rc=1
    leftovers
    rm -rf "$d"
    return $rc
}
# Pods start from VM templates: the first pod of a shape makes its template, and it and the
# next restore it (the shim logs both; no clone falls back to a cold boot). Two clones' RNGs differ and their clocks are the host's. A template
# changed on disk is refused, removed and made again, never restored; a pod of another size
# gets a template of its own; with [pod] templates = false a pod boots its kernel.
husk_templates() {
    local d rc=0 p1 p2 p3 p4 p5 c1 c2 f log=$CRI_ROOT/containerd.log
    d=$(mktemp -d)
    "$husk" template remove --all
    # counts: how many templates were made, restored and refused so far.
    counts() {
        echo "made $(grep -c 'msg="made the VM template' "$log") restored $(grep -c 'restored from a VM template' "$log") refused $(grep -c 'refusing the VM template' "$log")"
    }
    # delta BEFORE: what counts added since BEFORE.
    delta() {
        local -a a b
        read -ra a <<<"$1"
        read -ra b <<<"$(counts)"
        echo "made $((b[1] - a[1])) restored $((b[3] - a[3])) refused $((b[5] - a[5]))"
    }
    local c0 p0
    c0=$(counts)
    pod_json "$d/p0.json" pod-tpl-0 true
    p0=$("${CRICTL[@]}" runp "$d/p0.json") || return 1
    echo "first pod: $(delta "$c0")"
    c0=$(counts)
    pod_json "$d/p1.json" pod-tpl-1 true
    pod_json "$d/p2.json" pod-tpl-2 true
    container_json "$d/c.json" c-tpl '["sleep","3600"]'
    p1=$("${CRICTL[@]}" runp "$d/p1.json") && p2=$("${CRICTL[@]}" runp "$d/p2.json") || return 1
    c1=$("${CRICTL[@]}" create "$p1" "$d/c.json" "$d/p1.json") && "${CRICTL[@]}" start "$c1" >/dev/null || return 1
    c2=$("${CRICTL[@]}" create "$p2" "$d/c.json" "$d/p2.json") && "${CRICTL[@]}" start "$c2" >/dev/null || return 1
    echo "two pods: $(delta "$c0")"
    local u1 u2 t1 t2 now
    u1=$("${CRICTL[@]}" exec -s "$c1" cat /proc/sys/kernel/random/uuid)
    u2=$("${CRICTL[@]}" exec -s "$c2" cat /proc/sys/kernel/random/uuid)
    t1=$("${CRICTL[@]}" exec -s "$c1" date +%s) t2=$("${CRICTL[@]}" exec -s "$c2" date +%s) now=$(date +%s)
    echo "random: $u1 $u2 ($([[ -n $u1 && $u1 != "$u2" ]] && echo differ || echo same))"
    local skew=$(((now - t1) > (now - t2) ? now - t1 : now - t2))
    echo "clocks: host $now clones $t1 $t2 ($((skew <= 5 && skew >= -1 ? 1 : 0)) within 5 s)"
    echo "templates: $("$husk" template list | grep -vc unsound) sound"
    # A byte of the template's memory changed on disk: refused, removed, made again (by that
    # pod, which restores it).
    f=$(find /var/lib/husk/templates -name memory | head -1)
    printf 'X' | dd of="$f" bs=1 seek=8192 conv=notrunc status=none
    c0=$(counts)
    pod_json "$d/p3.json" pod-tpl-3 true
    p3=$("${CRICTL[@]}" runp "$d/p3.json") || return 1
    echo "after a changed template: $(delta "$c0") ($("${CRICTL[@]}" inspectp "$p3" | grep -o '"state": *"SANDBOX_READY"' | head -1))"
    # Another memory size: another template.
    cp /etc/husk/config.toml "$d/husk-config"
    printf '\n[pod]\nmemory_mib = 320\n' >>/etc/husk/config.toml
    c0=$(counts)
    pod_json "$d/p4.json" pod-tpl-4 true
    p4=$("${CRICTL[@]}" runp "$d/p4.json") || rc=1
    echo "another size: $(delta "$c0"), templates $("$husk" template list | grep -vc unsound)"
    # Templates off: the pod boots its kernel.
    cp "$d/husk-config" /etc/husk/config.toml
    printf '\n[pod]\ntemplates = false\n' >>/etc/husk/config.toml
    c0=$(counts)
    pod_json "$d/p5.json" pod-tpl-5 true
    p5=$("${CRICTL[@]}" runp "$d/p5.json") || rc=1
    echo "templates off: $(delta "$c0")"
    echo "clones booted cold instead: $(grep -c 'clone did not answer within' "$log")"
    cp "$d/husk-config" /etc/husk/config.toml
    "${CRICTL[@]}" stop -t 1 "$c1" "$c2" >/dev/null
    "${CRICTL[@]}" rm "$c1" "$c2" >/dev/null
    "${CRICTL[@]}" stopp "$p0" "$p1" "$p2" "$p3" ${p4:+"$p4"} ${p5:+"$p5"} >/dev/null &&
        "${CRICTL[@]}" rmp "$p0" "$p1" "$p2" "$p3" ${p4:+"$p4"} ${p5:+"$p5"} >/dev/null || rc=1
    leftovers
    rm -rf "$d"
    return $rc
}
echo "=== husk_templates"
husk_templates
ended husk_templates $?

echo "=== husk_standalone"
husk_standalone
ended husk_standalone $?

# A pod whose VM cannot start fails runp with why, and leaves nothing. The kernel is the
# one husk install put in place, which husk's config names.
echo "=== husk_no_kernel"
cache=/usr/local/share/husk
mv "$cache/vmlinux" "$cache/vmlinux.away"
d=$(mktemp -d)
pod_json "$d/pod.json" pod-nokernel true
"${CRICTL[@]}" runp "$d/pod.json" 2>&1 | grep -o "the guest kernel [^ ]* does not exist"
# husk doctor names the missing kernel, and exits 1.
"$husk" doctor --containerd-config "$CRI_ROOT/config.toml" | grep -E "^FAIL  guest kernel|^husk doctor:"
echo "doctor without the kernel: rc ${PIPESTATUS[0]}"
mv "$cache/vmlinux.away" "$cache/vmlinux"
leftovers
echo "=== husk_no_kernel rc=0"
cri_stop
