#!/usr/bin/env bash
# Sourced INSIDE the nested-KVM testbed by the containerd tests: a private containerd 1.6 with
# the CRI plugin, a CNI bridge network, local images (pause and busybox, built here as OCI
# archives and imported with ctr) and crictl pointed at it.
#
#   . tests/scripts/cri-env.sh; cri_config; (edit $CRI_ROOT/config.toml); cri_launch; ...; cri_stop
# Needs: containerd, runc, containernetworking-plugins, busybox-static, crictl (scripts/setup.sh).

CRI_REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
CRI_ROOT=/run/husk-cri
CRI_SOCK=$CRI_ROOT/containerd.sock
export CONTAINER_RUNTIME_ENDPOINT=unix://$CRI_SOCK IMAGE_SERVICE_ENDPOINT=unix://$CRI_SOCK
# crictl gives up on a call after this (a kubelet's default runtime request timeout).
CRI_TIMEOUT=${CRI_TIMEOUT:-120s}
CRICTL=(crictl --config "$CRI_ROOT/crictl.yaml" --timeout "$CRI_TIMEOUT")

# oci_blobs BLOBS CONFIG_JSON LAYER_DIR...: the layers (the given directories as tars, bottom
# first; files named .wh.NAME and .wh..wh..opq in them are OCI whiteouts), an image config whose
# "config" is CONFIG_JSON, and their manifest, as blobs in BLOBS/sha256; the manifest's digest
# (hex) and size in OCI_MANIFEST and OCI_MANIFEST_SIZE.
oci_blobs() {
    local blobs=$1 config=$2 l digest layers='' diffs='' cfg tmp
    shift 2
    mkdir -p "$blobs/sha256"
    tmp=$(mktemp -d)
    # oci_put FILE: FILE moved into BLOBS under its digest, which is echoed.
    oci_put() {
        local d
        d=$(sha256sum "$1" | cut -d' ' -f1)
        mv "$1" "$blobs/sha256/$d"
        echo "$d"
    }
    for l in "$@"; do
        tar -C "$l" --numeric-owner --owner=0 --group=0 -cf "$tmp/layer.tar" .
        digest=$(oci_put "$tmp/layer.tar")
        layers+="${layers:+,}{\"mediaType\":\"application/vnd.oci.image.layer.v1.tar\",\"digest\":\"sha256:$digest\",\"size\":$(stat -c %s "$blobs/sha256/$digest")}"
        diffs+="${diffs:+,}\"sha256:$digest\""
    done
    printf '{"architecture":"amd64","os":"linux","config":%s,"rootfs":{"type":"layers","diff_ids":[%s]}}' \
        "$config" "$diffs" >"$tmp/config.json"
    cfg=$(oci_put "$tmp/config.json")
    printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:%s","size":%d},"layers":[%s]}' \
        "$cfg" "$(stat -c %s "$blobs/sha256/$cfg")" "$layers" >"$tmp/manifest.json"
    OCI_MANIFEST=$(oci_put "$tmp/manifest.json")
    OCI_MANIFEST_SIZE=$(stat -c %s "$blobs/sha256/$OCI_MANIFEST")
    rm -rf "$tmp"
}

# oci_layers DIR NAME ENTRYPOINT_JSON LAYER_DIR... -> DIR/image.tar: an OCI archive whose
# layers are the given directories, bottom first, named NAME for `ctr images import`.
oci_layers() {
    local dir=$1 name=$2 entrypoint=$3
    shift 3
    oci_blobs "$dir/oci/blobs" "{\"Entrypoint\":$entrypoint,\"Env\":[\"PATH=/bin\"]}" "$@"
    printf '{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:%s","size":%d,"annotations":{"io.containerd.image.name":"%s","org.opencontainers.image.ref.name":"%s"}}]}' \
        "$OCI_MANIFEST" "$OCI_MANIFEST_SIZE" "$name" "${name##*:}" >"$dir/oci/index.json"
    echo '{"imageLayoutVersion":"1.0.0"}' >"$dir/oci/oci-layout"
    tar -C "$dir/oci" -cf "$dir/image.tar" .
}

# oci_image DIR NAME ENTRYPOINT_JSON -> DIR/image.tar: a one-layer OCI archive of a busybox
# root (kept in DIR/root), named NAME for `ctr images import`.
oci_image() {
    bash "$CRI_REPO/scripts/busybox-rootfs.sh" "$1/root"
    oci_layers "$1" "$2" "$3" "$1/root"
}

# cri_config: containerd's configuration and state on a tmpfs (the testbed's root is an
# overlay, which overlayfs snapshots cannot sit on), runc as the default runtime.
cri_config() {
    mkdir -p "$CRI_ROOT"
    mount -t tmpfs -o "size=${CRI_TMPFS_SIZE:-1g}" tmpfs "$CRI_ROOT"
    mkdir -p "$CRI_ROOT"/{root,state,images,cni-conf,failures} /etc/cni/net.d /var/lib/cni /run/netns
    printf 'runtime-endpoint: unix://%s\nimage-endpoint: unix://%s\ntimeout: 120\n' \
        "$CRI_SOCK" "$CRI_SOCK" >"$CRI_ROOT/crictl.yaml"
    cat >"$CRI_ROOT/cni-conf/10-husk.conflist" <<'JSON'
{"cniVersion": "1.0.0", "name": "husk-test",
 "plugins": [{"type": "bridge", "bridge": "husk-cni0", "isGateway": true, "ipMasq": false,
              "ipam": {"type": "host-local",
                       "ranges": [[{"subnet": "10.88.77.0/24"}], [{"subnet": "fd88:77::/64"}]],
                       "routes": [{"dst": "0.0.0.0/0"}, {"dst": "::/0"}]}},
             {"type": "loopback"}]}
JSON
    {
        cat <<EOF
version = 2
root = "$CRI_ROOT/root"
state = "$CRI_ROOT/state"
[grpc]
  address = "$CRI_SOCK"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "docker.io/husk/pause:1"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$CRI_ROOT/cni-conf"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
EOF
    } >"$CRI_ROOT/config.toml"
}

# cri_launch: containerd, and the pause and busybox images imported.
cri_launch() {
    local i
    containerd --config "$CRI_ROOT/config.toml" ${CRI_LOG_LEVEL:+--log-level "$CRI_LOG_LEVEL"} >"$CRI_ROOT/containerd.log" 2>&1 &
    echo $! >"$CRI_ROOT/containerd.pid"
    for ((i = 0; i < 300; i++)); do
        "${CRICTL[@]}" info >/dev/null 2>&1 && break
        sleep 0.2
    done
    "${CRICTL[@]}" info >/dev/null || { tail -n 30 "$CRI_ROOT/containerd.log"; return 1; }
    oci_image "$CRI_ROOT/images/pause" docker.io/husk/pause:1 \
        '["/bin/sh","-c","trap \"exit 0\" TERM INT; while :; do sleep 3600 & wait; done"]'
    oci_image "$CRI_ROOT/images/busybox" docker.io/husk/busybox:1 '["/bin/sh"]'
    for i in pause busybox; do
        ctr --address "$CRI_SOCK" -n k8s.io images import "$CRI_ROOT/images/$i/image.tar" >/dev/null ||
            return 1
    done
}

# cri_restart: containerd stops and starts again (its state and the shims stay).
cri_restart() {
    local pid
    pid=$(cat "$CRI_ROOT/containerd.pid")
    kill "$pid" && wait "$pid" 2>/dev/null
    cri_again
}

# cri_again: containerd started again after it ended (its state and the shims stay),
# answering within 60 s.
cri_again() {
    local i
    containerd --config "$CRI_ROOT/config.toml" >>"$CRI_ROOT/containerd.log" 2>&1 &
    echo $! >"$CRI_ROOT/containerd.pid"
    for ((i = 0; i < 300; i++)); do
        "${CRICTL[@]}" info >/dev/null 2>&1 && return 0
        sleep 0.2
    done
    return 1
}

# cri_registry PORT TOOLS: critest's images, built as stand-ins (critest-images.sh), in
# a registry on 127.0.0.1:PORT (registry.py), and containerd's mirrors for the public
# registries pointing at it. Between cri_config and cri_launch.
cri_registry() {
    local r i
    for r in registry.k8s.io gcr.io docker.io quay.io; do
        printf '[plugins."io.containerd.grpc.v1.cri".registry.mirrors."%s"]\n  endpoint = ["http://127.0.0.1:%d"]\n' \
            "$r" "$1" >>"$CRI_ROOT/config.toml"
    done
    bash "$CRI_REPO/tests/scripts/critest-images.sh" "$CRI_ROOT/registry" "$2" || return 1
    python3 "$CRI_REPO/tests/scripts/registry.py" "$CRI_ROOT/registry" "$1" 2>"$CRI_ROOT/registry.log" &
    echo $! >"$CRI_ROOT/registry.pid"
    for ((i = 0; i < 50; i++)); do
        python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$1/v2/')" 2>/dev/null &&
            return 0
        sleep 0.2
    done
    echo "the registry did not come up: $(cat "$CRI_ROOT/registry.log")"
    return 1
}

cri_stop() {
    local pid
    [[ -n ${STALL_PID:-} ]] && kill "$STALL_PID" 2>/dev/null
    pid=$(cat "$CRI_ROOT/registry.pid" 2>/dev/null) && kill "$pid" 2>/dev/null
    pid=$(cat "$CRI_ROOT/containerd.pid" 2>/dev/null) && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
    umount -l "$CRI_ROOT" 2>/dev/null
    return 0
}

# bench_cri_up REPO: for the benchmarks, containerd (configured by cri_config before) with husk
# installed from REPO's release build (else its debug one), stopped when the script exits.
bench_cri_up() {
    local husk=$1/target/release/husk
    [[ -x $husk ]] || husk=$1/target/debug/husk
    "$husk" install --config "$CRI_ROOT/config.toml" --bin-dir /usr/local/bin >/dev/null && cri_launch || return 1
    trap cri_stop EXIT
}

# pod_json FILE NAME RUNTIME_ANNOTATION(true|false) [DNS_CONFIG_JSON]: a pod sandbox config for
# crictl runp; $POD_LINUX is the inside of its "linux" object if set.
pod_json() {
    cat >"$1" <<EOF
{"metadata": {"name": "$2", "namespace": "default", "uid": "$2-uid", "attempt": 0},
 "log_directory": "$CRI_ROOT/logs/$2",
 "annotations": {"io.kubernetes.cri.untrusted-workload": "$3"},
 ${4:+"dns_config": $4,}
 "linux": {${POD_LINUX:-}}}
EOF
}

# container_json FILE NAME ARGS_JSON [EXTRA_LINUX_JSON]; the image is $IMAGE if set.
container_json() {
    cat >"$1" <<EOF
{"metadata": {"name": "$2"}, "image": {"image": "${IMAGE:-docker.io/husk/busybox:1}"},
 "command": $3, "log_path": "$2.log", "linux": {${4:-}}}
EOF
}

# husk_inventory: NAME=VALUE pairs of everything a husk pod could leave behind on the node
# (processes, mounts, files, network namespaces, links, tc filters, cgroups, loop devices, CRI's
# pods and containers), to compare with a baseline. The VM template cache is a cache (one
# template per pod shape, made by the first pod of that shape): its templates are not counted,
# a template's unfinished build (its VM's directory, its file being written) is.
husk_inventory() {
    local filters=0 dev
    for dev in /sys/class/net/*; do
        filters=$((filters + $(tc filter show dev "${dev##*/}" ingress 2>/dev/null | grep -c filter)))
    done
    echo "vmm=$(pgrep -c husk-vmm) shim=$(pgrep -c -f containerd-shim-husk) virtiofsd=$(pgrep -c -x virtiofsd)" \
        "mounts=$(wc -l </proc/self/mountinfo) run_files=$(find /run/husk 2>/dev/null | wc -l)" \
        "state_files=$(find /var/lib/husk -path /var/lib/husk/templates -prune -o -print 2>/dev/null | wc -l)" \
        "template_builds=$(find /var/lib/husk/templates \( -name vm -o -name 'memory.tmp' \) 2>/dev/null | wc -l)" \
        "netns=$(find /run/netns -mindepth 1 2>/dev/null | wc -l)" \
        "links=$(ip -o link show | wc -l) tc_filters=$filters cgroups=$(find /sys/fs/cgroup -type d | wc -l)" \
        "loops=$(losetup -a | wc -l) pods=$("${CRICTL[@]}" pods -q | wc -l) containers=$("${CRICTL[@]}" ps -aq | wc -l)"
}

# pss_kib PID...: the processes' proportional set size together, in KiB (a page they share
# counted once in all).
pss_kib() {
    local pid sum=0
    for pid in "$@"; do
        sum=$((sum + $(awk '/^Pss:/ {print $2}' "/proc/$pid/smaps_rollup" 2>/dev/null || echo 0)))
    done
    echo "$sum"
}

# pod_diagnosis FROM_LINE ID...: containerd's log (with the shims' lines) from line FROM_LINE
# on, the lines that name one of the non-empty IDs or are warnings and errors, at most 60.
pod_diagnosis() {
    local from=$1 pattern='level=(warning|error|fatal)' id
    shift
    for id in "$@"; do
        [[ -n $id ]] && pattern+="|$id"
    done
    tail -n "+$from" "$CRI_ROOT/containerd.log" | grep -E "$pattern" | tail -n 60
}

# short_reason TEXT: crictl's error made short enough to read in one line: its log prefix
# (time=... level=fatal msg=) gone, every 64-hex id cut to its first 12 digits.
short_reason() {
    sed -E 's/time="[^"]*" level=[a-z]+ msg=//; s/([0-9a-f]{12})[0-9a-f]{52}/\1/g' <<<"$1"
}

# vm_evidence POD: what pod POD's microVM itself shows, taken before the pod is cleaned up:
# the VMM's status (each vCPU's exits and a register sample, each device's state) and the
# guest console's last lines. The shim keeps a VM's last words in its log only when the VM
# ends by itself; a VM that hangs is ended by the cleanup, and this is all there is of it.
vm_evidence() {
    local dir sock
    for dir in /run/husk/shim/*/"$1"*; do
        [[ -f $dir/pod.json ]] || continue
        sock=$(grep -o '"api_socket": *"[^"]*"' "$dir/pod.json" | sed 's/.*: *"//; s/"$//')
        echo "the VMM's status: $([[ -S $sock ]] && timeout 10 "${STALL_HUSK:-husk}" vmm --api "$sock" status 2>&1 | tr -d '\n' | cut -c1-1500)"
        find "$dir" -name serial.log | while read -r t; do
            echo "the guest console's last lines ($t):"
            tail -n 15 "$t" | sed 's/^/console| /'
        done
    done
}

# stall_watch SECS: in the background, a report on every crictl call that has run SECS or
# more (once per call): what it waits for, seen from every side, while it still waits. Its
# lines start with "stall: "; every 5 minutes a "watch: " line says L1 is alive. $STALL_HUSK is the husk binary (for the VMM's state); the
# watcher's pid is in $STALL_PID.
stall_watch() {
    local limit=$1
    (
        declare -A told=()
        local beat=0
        while sleep 10 >/dev/null; do
            local pid
            # A sign of life every 5 minutes: a stall with no report after it is L1 itself.
            if ((++beat % 30 == 0)); then
                echo "watch: L1 alive, load $(cut -d' ' -f1-3 /proc/loadavg), crictl calls running: $(pgrep -c -x crictl)"
            fi
            for pid in $(pgrep -x crictl); do
                [[ -n ${told[$pid]:-} ]] && continue
                local age
                age=$(ps -o etimes= -p "$pid" 2>/dev/null | tr -d ' ')
                if [[ -z $age ]] || ((age < limit)); then
                    continue
                fi
                told[$pid]=1
                stall_report "$pid" "$age" 2>&1 | sed 's/^/stall: /'
            done
        done
    ) &
    export STALL_PID=$!
}

# stall_report PID AGE: what crictl PID (running AGE s) waits for: the call, the processes
# of husk's pods, each shim thread's kernel wait, containerd's goroutines in CRI calls, the
# pod's shim and VMM log lines in containerd's log, its VMM's state and its guest console.
stall_report() {
    local pid=$1 age=$2 shim t dir sock n
    echo "crictl $pid has waited ${age}s: $(tr '\0' ' ' <"/proc/$pid/cmdline")"
    ps -eo pid,ppid,etimes,stat,wchan:24,args | awk '/crictl|containerd|husk|virtiofsd/ && !/awk/'
    for shim in $(pgrep -f containerd-shim-husk-v2); do
        for t in /proc/"$shim"/task/*; do
            echo "shim $shim thread ${t##*/} $(cat "$t/comm") $(cat "$t/wchan" 2>/dev/null) $(tr '\n' ' ' <"$t/stack" 2>/dev/null | cut -c1-200)"
        done
    done
    n=$(wc -l <"$CRI_ROOT/containerd.log")
    kill -USR1 "$(cat "$CRI_ROOT/containerd.pid")"
    sleep 2
    # The goroutines of CRI calls and of the task service, each whole (they are separated by
    # blank lines), from the dump just asked for.
    tail -n "+$((n + 1))" "$CRI_ROOT/containerd.log" |
        awk 'BEGIN {RS = ""} /cri\/server|services\/tasks|runtime\/v2|shim/ && !/ttrpc\.\(\*Client\)\.run|Server\)\.Serve/ {print; print ""}' | head -n 200
    echo "containerd's last log lines:"
    head -n "$n" "$CRI_ROOT/containerd.log" | tail -n 60
    for dir in /run/husk/shim/*/*; do
        [[ -f $dir/pod.json ]] || continue
        echo "pod run dir $dir: $(tr -d '\n' <"$dir/pod.json" | cut -c1-600)"
        sock=$(grep -o '"api_socket": *"[^"]*"' "$dir/pod.json" | sed 's/.*: *"//; s/"$//')
        [[ -S $sock ]] && timeout 10 "$STALL_HUSK" vmm --api "$sock" metrics 2>&1 | head -c 3000
        echo
        find "$dir" -name serial.log | while read -r t; do
            echo "console $t:"
            tail -n 40 "$t"
        done
    done
}

# pod_life NAME DIR: one husk pod's whole life (runp, create, start, logs, exec, stop, rm,
# stopp, rmp) with its network (it pings the CNI gateway), its image's layers and a live volume
# (DIR/vol: the container writes a file, the host reads it); prints "ok FDS" (the most fds its
# shim held) or "failed at STEP: WHY", and leaves nothing of the pod behind either way.
pod_life() {
    local name=$1 d=$2 pod='' ctr='' shim fds=0 i from
    # The result goes to fd 3, this function's stdout, also from inside $(...).
    exec 3>&1
    mkdir -p "$d/vol"
    # Where containerd's log stood when this pod began (for a failure's diagnosis).
    from=$(($(wc -l <"$CRI_ROOT/containerd.log") + 1))
    pod_json "$d/pod.json" "$name" true
    cat >"$d/c.json" <<EOF
{"metadata": {"name": "$name"}, "image": {"image": "docker.io/husk/busybox:1"},
 "command": ["sh", "-c", "echo $name > /vol/out && echo started && exec sleep 1000"],
 "mounts": [{"container_path": "/vol", "host_path": "$d/vol"}],
 "log_path": "$name.log", "linux": {}}
EOF
    fail() {
        echo "failed at $(short_reason "$1")" >&3
        {
            pod_diagnosis "$from" "$name" "$pod" "$ctr"
            [[ -n $pod ]] && vm_evidence "$pod"
        } >"$CRI_ROOT/failures/$name.log"
        [[ -n $ctr ]] && "${CRICTL[@]}" rm -f "$ctr" >/dev/null 2>&1
        if [[ -n $pod ]]; then
            "${CRICTL[@]}" stopp "$pod" >/dev/null 2>&1
            "${CRICTL[@]}" rmp -f "$pod" >/dev/null 2>&1
        fi
        rm -rf "$d"
    }
    # cri STEP ARGS...: crictl ARGS, its output echoed, how long it took appended to
    # $CRI_ROOT/steps.log ("STEP MS"); on failure the pod is cleaned up, the step and crictl's
    # last error line printed, and 1 returned.
    cri() {
        local step=$1 t rc=0
        shift
        t=$(date +%s%N)
        "${CRICTL[@]}" "$@" 2>"$d/err" || rc=$?
        echo "$step $((($(date +%s%N) - t) / 1000000))" >>"$CRI_ROOT/steps.log"
        ((rc == 0)) || { fail "$step: $(tail -n 1 "$d/err")"; return 1; }
    }
    pod=$(cri runp runp "$d/pod.json") || return
    ctr=$(cri create create "$pod" "$d/c.json" "$d/pod.json") || return
    cri start start "$ctr" >/dev/null || return
    for ((i = 0; i < 300; i++)); do
        grep -q started <<<"$("${CRICTL[@]}" logs "$ctr" 2>/dev/null)" && break
        sleep 0.1
    done
    if ! grep -q started <<<"$("${CRICTL[@]}" logs "$ctr" 2>/dev/null)"; then
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

# inventory_diff BASE INVENTORY: one line "NAME BASE->NOW" per counter that differs.
inventory_diff() {
    local kv b
    for kv in $2; do
        b=$(tr ' ' '\n' <<<"$1" | grep "^${kv%%=*}=")
        [[ $kv != "$b" ]] && echo "${kv%%=*} ${b#*=}->${kv#*=}"
    done
    return 0
}

# husk_cri_up HUSK: containerd (cri_config, cri_launch) with the husk of binary HUSK installed
# as its untrusted-workload runtime, stopped when the script exits.
husk_cri_up() {
    if ! { cri_config && "$1" install --config "$CRI_ROOT/config.toml" --bin-dir /usr/local/bin >/dev/null &&
        cri_launch; }; then
        echo "containerd did not come up"
        tail -n 30 "$CRI_ROOT/containerd.log"
        return 1
    fi
    trap cri_stop EXIT
}

# husk_baseline HUSK: husk_cri_up, then a warm-up pod (it fills the layer cache), then the
# inventory every later check compares with, in $base; prints both.
husk_baseline() {
    husk_cri_up "$1" || return 1
    work=$(mktemp -d)
    echo "warm-up pod: $(pod_life warm "$work/warm")"
    sleep 1
    base=$(husk_inventory)
    echo "baseline: $base"
}
