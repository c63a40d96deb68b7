#!/usr/bin/env bash
# Run inside the nested-KVM testbed by tests/tests/microvm.rs: every check boots its own
# microVM with `husk run` (or husk-vmm directly) and prints its result between markers
#   === NAME
#   ...output...
#   === NAME rc=N
# Usage: microvm-checks.sh REPO ROOTFS NEVER_READY_INITRAMFS OCI_LAYOUT OCI_TARBALL
set -uo pipefail
repo=$1 rootfs=$2 never_ready=$3 oci_layout=$4 oci_tarball=$5
husk="$repo/target/debug/husk"
vmm="$repo/target/debug/husk-vmm"
kernel=${HUSK_CACHE:-/var/cache/husk}/current/vmlinux
initramfs=${HUSK_CACHE:-/var/cache/husk}/current/initramfs.cpio.gz
# shellcheck source-path=SCRIPTDIR source=cri-env.sh
. "$repo/tests/scripts/cri-env.sh"
export XDG_RUNTIME_DIR=/run/husk-test
mkdir -p "$XDG_RUNTIME_DIR"

# HUSK_CHECKS="NAME ..." runs only those (debugging one check in the testbed).
check() {
    local name=$1
    shift
    [[ -z ${HUSK_CHECKS:-} || " $HUSK_CHECKS " == *" $name "* ]] || return 0
    echo "=== $name"
    "$@" 2>&1
    echo "=== $name rc=$?"
}

# wait_gone PID WHAT AFTER: waits up to 30 s for a child to exit, SIGKILLs it (saying so)
# if it does not; returns its exit status.
wait_gone() {
    local pid=$1 i
    for ((i = 0; i < 300; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -0 "$pid" 2>/dev/null && { echo "$2 still running 30 s after $3"; kill -KILL "$pid"; }
    wait "$pid"
}

start=$(date +%s%N)
check hello "$husk" run --no-template --timings "$rootfs" -- sh -c 'echo hello from husk; exit 7'
echo "husk run wall time: $(( ($(date +%s%N) - start) / 1000000 )) ms"
# The same from a VM template (as by default): the first run makes it, and all three restore
# it; each guest's RNG output (and boot id, made at its first read) is its own.
hello_template() {
    local i
    "$husk" template remove --all
    for i in 1 2 3; do
        # shellcheck disable=SC2016 # expanded in the guest
        "$husk" run --timings "$rootfs" -- sh -c 'echo "hello from a clone: $(cat /proc/sys/kernel/random/boot_id) $(cat /proc/sys/kernel/random/uuid)"; exit 7'
        echo "run $i: rc $?"
    done
    "$husk" template list
}
check hello_template hello_template
# A template that passes the checks before use (its size, inode and modification time kept)
# but whose saved state is damaged: the VMM refuses it, the run boots cold and removes it;
# the next run makes it again and restores it.
template_refused() {
    local f ref size
    f=$(find /var/lib/husk/templates -name memory | head -1)
    [[ -n $f ]] || { echo "no template to damage"; return 1; }
    ref=$(mktemp)
    touch -r "$f" "$ref"
    size=$(stat -c %s "$f")
    # The state (JSON) ends 16 bytes before the file's end: its length, then the end mark.
    printf 'X' | dd of="$f" bs=1 seek=$((size - 17)) conv=notrunc status=none
    touch -r "$ref" "$f"
    rm -f "$ref"
    "$husk" run --timings "$rootfs" -- sh -c 'exit 7'
    echo "run damaged: rc $?"
    echo "templates after: $("$husk" template list | wc -l)"
    "$husk" run --timings "$rootfs" -- sh -c 'exit 7'
    echo "run again: rc $?"
    "$husk" template list
}
check template_refused template_refused
# stdout and stderr stay apart.
streams() {
    local err=$XDG_RUNTIME_DIR/streams.err out
    out=$("$husk" run "$rootfs" -- sh -c 'echo to-stdout; echo to-stderr >&2' 2>"$err")
    local rc=$?
    echo "stdout: $out"
    echo "stderr: $(grep -v '^husk' "$err")"
    rm -f "$err"
    return "$rc"
}
check streams streams
# shellcheck disable=SC2016 # expanded by the container's shell
check kernel "$husk" run "$rootfs" -- sh -c 'uname -r; cat /proc/sys/kernel/random/boot_id; cat /proc/self/cgroup; grep -o -m1 -w tsc_deadline_timer /proc/cpuinfo; echo "controllers: $(cat /sys/fs/cgroup/cgroup.controllers)"; echo "kernel controllers: $(cut -f1 /proc/cgroups | tail -n +2 | tr "\n" " ")"; echo "filesystems: $(grep -ow -E "ext4|overlay|erofs|tmpfs|cgroup2" /proc/filesystems | tr "\n" " ")"'
# An OCI image layout, as a directory and as a tarball: its entrypoint runs.
check oci_layout "$husk" run "$oci_layout"
check oci_tarball "$husk" run "$oci_tarball" -- sh -c 'echo from the tarball; cat /etc/image-marker'
echo "=== l1 boot_id"; cat /proc/sys/kernel/random/boot_id
check meminfo "$husk" run "$rootfs" -- sh -c 'grep -E "^(MemTotal|MemAvailable):" /proc/meminfo'
check ps "$husk" run "$rootfs" -- sh -c 'ps -o pid,comm'
check oom "$husk" run --memory 512 --container-memory 64 "$rootfs" -- dd if=/dev/zero of=/dev/null bs=200M count=1
# shellcheck disable=SC2016 # expanded by the container's shell
check cpu "$husk" run --cpus 2 --container-cpus 0.5 "$rootfs" -- sh -c \
    'echo "nproc=$(nproc)"; a=$(grep usage_usec /sys/fs/cgroup/cpu.stat | head -1 | cut -d" " -f2); t0=$(date +%s); while [ $(( $(date +%s) - t0 )) -lt 4 ]; do :; done; b=$(grep usage_usec /sys/fs/cgroup/cpu.stat | head -1 | cut -d" " -f2); echo "cpu_usec=$((b - a)) wall_sec=$(( $(date +%s) - t0 ))"; grep nr_throttled /sys/fs/cgroup/cpu.stat'
check stdin sh -c "printf 'one\ntwo\n' | '$husk' run -i '$rootfs' -- cat"
# A terminal: `script` gives husk a pty on this side.
check tty script -qec "stty rows 30 cols 100; '$husk' run -t '$rootfs' -- sh -c 'test -t 0 && test -t 1 && echo tty-ok; stty size'" /dev/null

# Ctrl-C while the container runs, and while the VM boots: a terminal sends SIGINT to the
# whole foreground process group, so husk runs in its own group (setsid) and the group gets
# it; husk ends the container and the VM, and cleans up.
interrupt() {
    local when=$1 log=$XDG_RUNTIME_DIR/interrupt.log pid rc i
    setsid "$husk" run --timings "$rootfs" -- sleep 1000 >"$log" 2>&1 &
    pid=$!
    if [[ $when == running ]]; then
        for ((i = 0; i < 600; i++)); do
            grep -q "container starting" "$log" && break
            sleep 0.2
        done
        sleep 1
    else
        # Once husk made its run directory it handles SIGINT (before that, a background
        # job of this script ignores it, as non-interactive shells set up).
        for ((i = 0; i < 600; i++)); do
            compgen -G "$XDG_RUNTIME_DIR/run-*" >/dev/null && break
            sleep 0.05
        done
    fi
    kill -INT -- "-$pid"
    wait_gone "$pid" husk SIGINT
    rc=$?
    cat "$log"
    rm -f "$log"
    return "$rc"
}
check interrupt interrupt running
check interrupt_boot interrupt booting

# jailed_vmm DIR UID ARGS...: starts husk-vmm in the background (256 MiB, its sockets and
# root in DIR/jail, user and group UID, its log in DIR) with ARGS; its pid in vmm_pid.
jailed_vmm() {
    local d=$1 uid=$2
    shift 2
    "$vmm" --kernel "$kernel" --initramfs "$initramfs" --mem-mib 256 \
        --serial-log "$d/serial.log" --vsock-uds "$d/jail/vsock.sock" --api-sock "$d/jail/api.sock" \
        --jail "$d/jail" --uid "$uid" --gid "$uid" "$@" >"$d/vmm.log" 2>&1 &
    vmm_pid=$!
}

# drive_bundle DIR SCRIPT: an OCI bundle in DIR whose process runs `sh -c SCRIPT` as root on
# a root filesystem from a drive (the agent's --block), with /proc and an empty /dev.
drive_bundle() {
    local script=${2//\\/\\\\}
    script=${script//\"/\\\"}
    mkdir -p "$1"
    cat >"$1/config.json" <<JSON
{"ociVersion": "1.0.2",
 "process": {"args": ["sh", "-c", "$script"],
             "cwd": "/", "env": ["PATH=/bin:/sbin:/usr/bin"], "user": {"uid": 0, "gid": 0}},
 "root": {"path": "rootfs"},
 "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "mode=755"]}],
 "linux": {"namespaces": [{"type": "pid"}, {"type": "mount"}, {"type": "ipc"}, {"type": "uts"}]}}
JSON
}

# Drives (husk-vmm, jailed, and the agent driven directly): a container on a read-only ext4
# drive, then a second drive filled later through the control API (the file passed to the
# jailed VMM; one bigger than its file size limit refused first), used by a second
# container; after the guest powers off the VMM is gone, its sockets left to its caller.
drives() {
    local d rc vmm_pid
    d=$(mktemp -d "$XDG_RUNTIME_DIR/drives.XXXXXX")
    # The jailed VMM's file size limit is its largest writable drive at start, or its
    # memory and 16 MiB (a snapshot; 272 MiB here): b fits, big does not.
    for n in a b; do
        mkdir -p "$d/$n"
        cp -a "$rootfs/." "$d/$n/"
        echo "drive-$n" >"$d/$n/marker"
        mkfs.ext4 -q -d "$d/$n" "$d/$n.ext4" 16M || return 1
        rm -rf "${d:?}/$n"
    done
    truncate -s 1G "$d/big.img"
    mkdir "$d/jail"
    # shellcheck disable=SC2016
    drive_bundle "$d/bundle" 'cat /marker; if touch /written; then echo writable; else echo read-only; fi'
    jailed_vmm "$d" 1600099999 --drive "id=rootfs,path=$d/a.ext4,ro=true" --drive "id=late,path="
    local A=("$husk" agent --addr "hvsock:$d/jail/vsock.sock" --timeout-secs 60)
    "${A[@]}" --wait check >/dev/null &&
        "${A[@]}" create-sandbox pod >/dev/null &&
        "${A[@]}" create --bundle "$d/bundle" --block /dev/vda:ext4:ro first >/dev/null &&
        "${A[@]}" start first >/dev/null && "${A[@]}" attach first &&
        echo "vmm user: $(awk '/^Uid:/ {print $2}' "/proc/$vmm_pid/status"), root: $(find "/proc/$vmm_pid/root/" -mindepth 1 -printf '%f\n' | sort | xargs)" &&
        { "$husk" vmm --api "$d/jail/api.sock" update-drive --writable late "$d/big.img" 2>&1 || true; } &&
        "$husk" vmm --api "$d/jail/api.sock" update-drive --writable late "$d/b.ext4" >/dev/null &&
        "${A[@]}" create --bundle "$d/bundle" --block /dev/vdb:ext4 second >/dev/null &&
        "${A[@]}" start second >/dev/null && "${A[@]}" attach second &&
        "${A[@]}" destroy-sandbox pod
    rc=$?
    ((rc == 0)) || { tail -n 5 "$d/vmm.log" "$d/serial.log"; kill "$vmm_pid"; }
    # The guest powered off (or was told to stop): the VMM must be gone within 30 s.
    wait_gone "$vmm_pid" husk-vmm "the guest ended"
    echo "vmm exit $?"
    echo "sockets left for the caller: $(find "$d" -name '*.sock' | wc -l)"
    rm -rf "$d"
    return "$rc"
}
check drives drives

# SIGTERM to husk-vmm stops the VM like the control API's stop: exit 0, sockets removed.
vmm_sigterm() {
    local d vmm_pid i
    d=$(mktemp -d "$XDG_RUNTIME_DIR/sigterm.XXXXXX")
    "$vmm" --kernel "$kernel" --initramfs "$initramfs" --mem-mib 128 \
        --serial-log "$d/serial.log" --vsock-uds "$d/vsock.sock" --api-sock "$d/api.sock" >"$d/vmm.log" 2>&1 &
    vmm_pid=$!
    for ((i = 0; i < 300; i++)); do
        [[ -S $d/api.sock ]] && break
        sleep 0.1
    done
    kill -TERM "$vmm_pid"
    wait_gone "$vmm_pid" husk-vmm SIGTERM
    echo "vmm exit $?"
    echo "sockets left: $(find "$d" -name '*.sock' | wc -l)"
    grep -h "stopping" "$d/vmm.log"
    rm -rf "$d"
}
check vmm_sigterm vmm_sigterm

# A VM template (issue 18): a booted VM whose agent answered is told it is a template, then
# snapshotted through its control socket (the VMM exits 0), with an empty drive slot. Two
# clones are restored from the template, each with its own vsock socket; each one's agent
# answers (the guest's vsock driver took the transport reset) but refuses a sandbox until
# told Restored (its RNG reseeded from the host, its clock set); then its drive slot gets a
# root filesystem and a container prints 16 random bytes and the guest's time; destroying
# the sandbox powers the clone off. A restore with another memory size is refused, naming it.
template() {
    local d vmm_pid rc=0 n t ms out
    d=$(mktemp -d "$XDG_RUNTIME_DIR/template.XXXXXX")
    mkdir -p "$d/root"
    cp -a "$rootfs/." "$d/root/"
    mkfs.ext4 -q -d "$d/root" "$d/root.ext4" 16M || return 1
    # shellcheck disable=SC2016
    drive_bundle "$d/bundle" 'echo random $(busybox od -An -tx1 -N16 /dev/urandom | busybox tr -d " \n"); echo time $(busybox date +%s)'
    "$vmm" --kernel "$kernel" --initramfs "$initramfs" --mem-mib 128 --drive "id=rootfs,path=,ro=true" \
        --serial-log "$d/serial.log" --vsock-uds "$d/vsock.sock" --api-sock "$d/api.sock" >"$d/vmm.log" 2>&1 &
    vmm_pid=$!
    t=$(date +%s%N)
    "$husk" agent --addr "hvsock:$d/vsock.sock" --timeout-secs 60 --wait check >/dev/null || rc=1
    echo "cold boot: agent answered $((($(date +%s%N) - t) / 1000000)) ms after the VMM started"
    ((rc == 0)) && { "$husk" agent --addr "hvsock:$d/vsock.sock" prepare-template || rc=1; }
    t=$(date +%s%N)
    ((rc == 0)) && { "$husk" vmm --api "$d/api.sock" snapshot "$d/template" || rc=1; }
    wait_gone "$vmm_pid" husk-vmm "the snapshot"
    echo "template vmm exit $?, after $((($(date +%s%N) - t) / 1000000)) ms; $(grep -ho 'snapshot: paused.*' "$d/vmm.log")"
    echo "template file: $(du -k --apparent-size "$d/template" | cut -f1) KiB apparent, $(du -k "$d/template" | cut -f1) KiB allocated"
    # The template's clock stands still while it is a file: the clones' are set by Restored.
    sleep 3
    for n in 1 2; do
        ((rc == 0)) || break
        t=$(date +%s%N)
        "$vmm" --restore "$d/template" --mem-mib 128 --drive "id=rootfs,path=,ro=true" --serial-log "$d/c$n.log" \
            --vsock-uds "$d/c$n.sock" --api-sock "$d/c$n.api" >"$d/c$n.vmm.log" 2>&1 &
        vmm_pid=$!
        local A=("$husk" agent --addr "hvsock:$d/c$n.sock" --timeout-secs 60)
        if "${A[@]}" --wait check >/dev/null; then
            ms=$((($(date +%s%N) - t) / 1000000))
            echo "clone $n: agent answered $ms ms after the VMM started ($(grep -ho 'restored from the snapshot [0-9]* ms' "$d/c$n.vmm.log"))"
            echo "clone $n before Restored: $("${A[@]}" create-sandbox pod 2>&1 | tail -n 1)"
            echo "clone $n: $("${A[@]}" restored 2>&1)"
            out=$("$husk" vmm --api "$d/c$n.api" update-drive rootfs "$d/root.ext4" >/dev/null &&
                "${A[@]}" create-sandbox pod >/dev/null &&
                "${A[@]}" create --bundle "$d/bundle" --block /dev/vda:ext4:ro c >/dev/null &&
                "${A[@]}" start c >/dev/null && "${A[@]}" attach c) || rc=1
            echo "clone $n container: $(tr '\n' ' ' <<<"$out")host time $(date +%s)"
            "${A[@]}" destroy-sandbox pod >/dev/null || { rc=1; kill "$vmm_pid"; }
        else
            rc=1
            echo "clone $n: no agent"
            tail -n 5 "$d/c$n.vmm.log" "$d/c$n.log"
            kill "$vmm_pid"
        fi
        wait_gone "$vmm_pid" husk-vmm "clone $n"
        echo "clone $n vmm exit $?"
    done
    "$vmm" --restore "$d/template" --mem-mib 256 --vsock-uds "$d/x.sock" 2>&1 | tail -n 1
    rm -rf "$d"
    return "$rc"
}
check template template

# A shared directory (virtio-fs): virtiofsd serves a host directory, the jailed husk-vmm
# gives it to the guest as tag husk-shared, a container mounts it: it reads what the host
# wrote before and after it started, and what it writes the host reads (owned by the uid
# that wrote it); a symlink in the share to a host file beside it, and `..`, reach nothing
# of the host's. After the guest powers off, the VMM and virtiofsd are gone.
fs_share() {
    local d rc vmm_pid fsd_pid virtiofsd=/usr/local/libexec/husk/virtiofsd
    [[ -x $virtiofsd ]] || { echo "no $virtiofsd (scripts/setup.sh builds it)"; return 1; }
    d=$(mktemp -d "$XDG_RUNTIME_DIR/fs.XXXXXX")
    mkdir -p "$d/shared" "$d/jail" "$d/bundle" "$d/root"
    echo "written by the host before" >"$d/shared/before"
    ln -s "$d/secret" "$d/shared/to-secret"
    echo "host-secret" >"$d/secret"
    cp -a "$rootfs/." "$d/root/"
    mkdir -p "$d/root/shared"
    mkfs.ext4 -q -d "$d/root" "$d/root.ext4" 16M || return 1
    cat >"$d/bundle/config.json" <<'JSON'
{"ociVersion": "1.0.2",
 "process": {"args": ["sh", "-c", "cat /shared/before; while [ ! -e /shared/after ]; do sleep 0.2; done; cat /shared/after; echo written by the guest >/shared/from-guest; echo \"symlink: $(cat /shared/to-secret 2>&1)\"; echo \"dotdot: $(cat /shared/../secret 2>&1)\""],
             "cwd": "/", "env": ["PATH=/bin:/sbin:/usr/bin"], "user": {"uid": 0, "gid": 0}},
 "root": {"path": "rootfs"},
 "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/shared", "type": "virtiofs", "source": "husk-shared"}],
 "linux": {"namespaces": [{"type": "pid"}, {"type": "mount"}, {"type": "ipc"}, {"type": "uts"}]}}
JSON
    "$virtiofsd" --socket-path "$d/fs.sock" --shared-dir "$d/shared" --sandbox namespace \
        --seccomp kill --cache auto --inode-file-handles=never >"$d/virtiofsd.log" 2>&1 &
    fsd_pid=$!
    local i
    for ((i = 0; i < 100; i++)); do
        [[ -S $d/fs.sock ]] && break
        sleep 0.1
    done
    [[ -S $d/fs.sock ]] || { echo "virtiofsd did not listen:"; cat "$d/virtiofsd.log"; return 1; }
    jailed_vmm "$d" 1600099998 --drive "id=rootfs,path=$d/root.ext4,ro=true" \
        --fs "tag=husk-shared,socket=$d/fs.sock"
    local A=("$husk" agent --addr "hvsock:$d/jail/vsock.sock" --timeout-secs 60)
    "${A[@]}" --wait check >/dev/null &&
        "${A[@]}" create-sandbox pod >/dev/null &&
        "${A[@]}" create --bundle "$d/bundle" --block /dev/vda:ext4:ro c >/dev/null &&
        "${A[@]}" start c >/dev/null &&
        { sleep 2; echo "written by the host after" >"$d/shared/after"; } &&
        echo "virtiofsd PSS: $(pss_kib "$fsd_pid" $(pgrep -P "$fsd_pid")) KiB" &&
        "${A[@]}" attach c &&
        echo "host reads: $(cat "$d/shared/from-guest")" &&
        echo "owner: $(stat -c %u "$d/shared/from-guest")" &&
        "${A[@]}" destroy-sandbox pod
    rc=$?
    ((rc == 0)) || { tail -n 5 "$d/vmm.log" "$d/serial.log" "$d/virtiofsd.log"; kill "$vmm_pid"; }
    wait_gone "$vmm_pid" husk-vmm "the guest ended"
    echo "vmm exit $?"
    wait_gone "$fsd_pid" virtiofsd "its VMM ended"
    echo "virtiofsd exit $?"
    grep -h "memory overhead" "$d/vmm.log"
    rm -rf "$d"
    return "$rc"
}
check fs_share fs_share

# --net tap:NAME: the guest's eth0 on a tap L1 made, with the address, default route and MTU
# given; TCP both ways (the guest fetches a line from L1, L1 sends one to the guest). husk
# leaves the tap (it did not make it).
net_tap() {
    local out pid i rc server
    ip tuntap add dev hrun0 mode tap || return 1
    ip addr add 10.77.0.1/24 dev hrun0
    ip link set hrun0 up
    out=$(mktemp "$XDG_RUNTIME_DIR/net.XXXXXX")
    /usr/bin/python3 -c '
import socket
s = socket.create_server(("10.77.0.1", 7001))
s.settimeout(120)
c, _ = s.accept()
c.sendall(b"from-l1\n")
c.close()' &
    server=$!
    # shellcheck disable=SC2016 # expanded by the container's shell
    "$husk" run --net tap:hrun0 --ip 10.77.0.2/24 --gateway 10.77.0.1 --mtu 1400 "$rootfs" -- sh -c '
        ip -o link show eth0; ip -o -4 addr show eth0; ip route
        echo "guest to L1: $(nc -w 10 10.77.0.1 7001 </dev/null)"
        echo ready; echo "L1 to guest: $(nc -l -p 7002 </dev/null)"' >"$out" 2>&1 &
    pid=$!
    for ((i = 0; i < 600; i++)); do
        grep -q '^ready' "$out" && break
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    /usr/bin/python3 -c '
import socket, time
for _ in range(100):
    try:
        c = socket.create_connection(("10.77.0.2", 7002), timeout=5)
        break
    except OSError:
        time.sleep(0.1)
c.sendall(b"from-l1-to-guest\n")
c.close()'
    wait_gone "$pid" "husk run --net" "the message"
    rc=$?
    kill "$server" 2>/dev/null
    wait "$server" 2>/dev/null
    cat "$out"
    rm -f "$out"
    ip -o link show hrun0 >/dev/null && echo "tap left to its owner"
    ip link del hrun0
    return "$rc"
}
check net_tap net_tap
check net_no_tap "$husk" run --net tap:nosuchtap0 --ip 10.77.0.2/24 "$rootfs" -- true
check net_bad_ip "$husk" run --net tap:x --ip 10.77.0.2/33 "$rootfs" -- true

check never_ready "$husk" run --boot-timeout 20 --initramfs "$never_ready" "$rootfs" -- true
check missing_kernel "$husk" run --kernel /nonexistent/vmlinux "$rootfs" -- true
# husk's configuration file is read (its kernel is the one looked for), and a mistake in it
# is named.
printf '[guest]\nkernel = "/nonexistent/configured-vmlinux"\n' >"$XDG_RUNTIME_DIR/config.toml"
check config_kernel env HUSK_CONFIG="$XDG_RUNTIME_DIR/config.toml" "$husk" run "$rootfs" -- true
printf '[pod]\nvcpu = 2\n' >"$XDG_RUNTIME_DIR/config.toml"
check config_bad env HUSK_CONFIG="$XDG_RUNTIME_DIR/config.toml" "$husk" run "$rootfs" -- true
rm -f "$XDG_RUNTIME_DIR/config.toml"
echo "=== leftovers"
pgrep -a husk-vmm
ls -A "$XDG_RUNTIME_DIR"
grep -c "$XDG_RUNTIME_DIR" /proc/mounts
echo "=== leftovers end"
