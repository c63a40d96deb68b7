#!/usr/bin/env bash
# vsock throughput, run INSIDE the nested-KVM testbed (scripts/bench.sh does that):
# one microVM (husk-vmm, the agent driven with `husk agent`), a busybox container, then
#   host -> guest: SIZE MiB into `cat > /dev/null` in the container (exec stdin stream)
#   guest -> host: SIZE MiB from `dd` in the container (exec stdout stream)
# over husk's stdio streams (hybrid vsock), beside a plain Unix-socket copy of the same
# size on the same L1, which is the ratio's peer.
# Usage: vsock-throughput.sh REPO ROOTFS_DIR [SIZE_MIB]
# HUSK_BENCH_VMM=PATH measures another husk-vmm build (e.g. the one before a change, beside
# the current one in the same testbed run); the output's first line names the VMM measured.
set -euo pipefail
repo=$1 rootfs=$2 size=${3:-256}
husk=$repo/target/release/husk vmm=$repo/target/release/husk-vmm
[[ -x $husk ]] || husk=$repo/target/debug/husk vmm=$repo/target/debug/husk-vmm
vmm=${HUSK_BENCH_VMM:-$vmm}
echo "vsock-throughput: VMM $vmm"
cache=${HUSK_CACHE:-/var/cache/husk}/current
d=$(mktemp -d /run/husk-bench.XXXXXX)
vmm_pid=''
cleanup() {
    local rc=$?
    if ((rc != 0)); then
        echo "vsock-throughput: failed ($rc); the VMM's and the guest's last words:" >&2
        tail -n 20 "$d/vmm.log" "$d/serial.log" >&2 2>/dev/null
    fi
    [[ -n $vmm_pid ]] && kill "$vmm_pid" 2>/dev/null
    rm -rf "$d"
}
trap cleanup EXIT

now() { date +%s%N; }
rate() { # rate BYTES START_NS END_NS -> MB/s (10^6 bytes)
    awk -v b="$1" -v s="$2" -v e="$3" 'BEGIN { printf "%.1f", b / ((e - s) / 1e9) / 1e6 }'
}
bytes=$((size * 1024 * 1024))

mkfs.ext4 -q -d "$rootfs" "$d/rootfs.ext4" 64M
mkdir -p "$d/bundle"
cat >"$d/bundle/config.json" <<'JSON'
{"ociVersion": "1.0.2",
 "process": {"args": ["sleep", "100000"], "cwd": "/", "env": ["PATH=/bin:/sbin:/usr/bin"],
             "user": {"uid": 0, "gid": 0}},
 "root": {"path": "rootfs"},
 "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "mode=755"]}],
 "linux": {"namespaces": [{"type": "pid"}, {"type": "mount"}]}}
JSON
"$vmm" --kernel "$cache/vmlinux" --initramfs "$cache/initramfs.cpio.gz" --mem-mib 256 \
    --serial-log "$d/serial.log" --vsock-uds "$d/vsock.sock" --api-sock "$d/api.sock" \
    --drive "id=rootfs,path=$d/rootfs.ext4,ro=false" >"$d/vmm.log" 2>&1 &
vmm_pid=$!
A=("$husk" agent --addr "hvsock:$d/vsock.sock" --timeout-secs 120)
"${A[@]}" --wait check >/dev/null
"${A[@]}" create-sandbox bench >/dev/null
"${A[@]}" create --bundle "$d/bundle" --block /dev/vda:ext4 c >/dev/null
"${A[@]}" start c >/dev/null

# Warm-up (first exec pays for page faults in the guest).
"${A[@]}" exec c warm -- true

t0=$(now)
head -c "$bytes" /dev/zero | "${A[@]}" exec -i c in -- sh -c 'cat > /dev/null'
t1=$(now)
got=$("${A[@]}" exec c out -- dd if=/dev/zero bs=65536 count=$((bytes / 65536)) 2>/dev/null | wc -c)
t2=$(now)
[[ $got -eq $bytes ]] || { echo "guest -> host: got $got of $bytes bytes" >&2; exit 1; }

# The peer: the same bytes through a Unix socket on this L1 (perl: a listener that
# discards, a client that copies stdin), no VM in between.
perl -MIO::Socket::UNIX -e '
    my $l = IO::Socket::UNIX->new(Local => $ARGV[0], Listen => 1) or die "listen: $!";
    print "ready\n"; $| = 1;
    my $c = $l->accept; my $buf; 1 while sysread($c, $buf, 65536);' "$d/uds" >"$d/uds.ready" &
uds_pid=$!
for _ in $(seq 100); do [[ -s $d/uds.ready ]] && break; sleep 0.05; done
t3=$(now)
head -c "$bytes" /dev/zero | perl -MIO::Socket::UNIX -e '
    my $c = IO::Socket::UNIX->new(Peer => $ARGV[0]) or die "connect: $!"; my $buf;
    while (my $n = sysread(STDIN, $buf, 65536)) { my $o = 0;
        while ($o < $n) { $o += syswrite($c, $buf, $n - $o, $o) // die "write: $!" } }' "$d/uds"
wait "$uds_pid"
t4=$(now)

h2g=$(rate "$bytes" "$t0" "$t1") g2h=$(rate "$bytes" "$t1" "$t2") uds=$(rate "$bytes" "$t3" "$t4")
echo "vsock stdio host->guest: $h2g MB/s ($size MiB)"
echo "vsock stdio guest->host: $g2h MB/s ($size MiB)"
echo "unix socket copy in L1:  $uds MB/s ($size MiB)"
awk -v a="$h2g" -v b="$g2h" -v u="$uds" \
    'BEGIN { printf "ratio to the unix socket: host->guest %.2f, guest->host %.2f\n", a / u, b / u }'
"${A[@]}" destroy-sandbox bench
wait "$vmm_pid" || true
vmm_pid=''
