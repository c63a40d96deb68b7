#!/bin/busybox sh
# shellcheck shell=dash
# /init of the L1 testbed VM (busybox sh, PID 1). Started by tests/testbed/run.sh.
#
# Mounts the host's root (virtio-9p tag "hostroot", read-only) under a tmpfs
# upper layer (overlayfs), mounts proc/sys/dev/cgroup2/tmp/run into it, then
# runs the job of the command line inside a chroot of it, moved onto / first:
#   husk.job=<dir on the host holding job.sh>  husk.time=<epoch seconds>
# Markers on the console (ttyS0), parsed by run.sh:
#   HUSK-TESTBED-BEGIN uptime=<s>    the job's output follows
#   HUSK-TESTBED-EXIT=<status>       the job's exit status; the VM then reboots
#   HUSK-TESTBED-ERROR=<message>     the testbed itself failed
# With `reboot=t` and QEMU's -no-reboot, `reboot -f` ends QEMU.
/bin/busybox --install -s /bin
export PATH=/bin

fail() {
    echo "HUSK-TESTBED-ERROR=$*"
    reboot -f
    sleep 60
}
trap 'fail "init exited unexpectedly"' EXIT

mkdir -p /proc /sys /dev /lower /rw /newroot
mount -t proc proc /proc || fail "mount proc"
mount -t sysfs sysfs /sys || fail "mount sysfs"
mount -t devtmpfs devtmpfs /dev 2>/dev/null
# The console echoes what the job writes: no \n -> \r\n translation.
stty -F /dev/console -onlcr 2>/dev/null

job='' time=''
# shellcheck disable=SC2013 # words, not lines
for arg in $(cat /proc/cmdline); do
    case $arg in
    husk.job=*) job=${arg#husk.job=} ;;
    husk.time=*) time=${arg#husk.time=} ;;
    esac
done
[ -n "$time" ] && date -s "@$time" >/dev/null
hostname husk-l1

# cache=loose: L1 keeps what it read in its page cache. The host's files do not change during
# a run (the job is written before L1 boots), and without a cache every read goes to QEMU:
# each microVM boot read its kernel (18 MB) again, 1.1 s (0.29 s cold, less warm, with it),
# and the first exec of the debug shim read 200 MB in 11.7 s (1.9 s with it).
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000,cache=loose hostroot /lower ||
    fail "cannot mount the host root (9p tag hostroot)"
mount -t tmpfs -o mode=0755 tmpfs /rw || fail "mount tmpfs"
mkdir -p /rw/upper /rw/work
mount -t overlay overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work /newroot ||
    fail "cannot mount the overlay over the host root"

r=/newroot
mount -t proc proc $r/proc || fail "mount proc in the root"
mount -t sysfs sysfs $r/sys || fail "mount sysfs in the root"
mount -t cgroup2 cgroup2 $r/sys/fs/cgroup || fail "mount cgroup2"
mount -t devtmpfs devtmpfs $r/dev || fail "mount devtmpfs in the root"
mkdir -p $r/dev/pts $r/dev/shm
mount -t devpts -o gid=5,mode=0620,ptmxmode=0666 devpts $r/dev/pts || fail "mount devpts"
mount -t tmpfs -o mode=1777 tmpfs $r/dev/shm || fail "mount /dev/shm"
ln -sfn /proc/self/fd $r/dev/fd
ln -sfn /proc/self/fd/0 $r/dev/stdin
ln -sfn /proc/self/fd/1 $r/dev/stdout
ln -sfn /proc/self/fd/2 $r/dev/stderr
# /tmp stays the overlay's: the host's /tmp shows through (a checkout or test files there
# must be visible inside), and writes go to the tmpfs upper layer.
mount -t tmpfs -o mode=0755 tmpfs $r/run || fail "mount /run"
ip link set lo up || fail "cannot bring up lo"

if [ -c /dev/kvm ]; then
    echo "husk-testbed: /dev/kvm present"
else
    echo "husk-testbed: WARNING: no /dev/kvm in L1"
fi

[ -n "$job" ] || fail "no husk.job= on the kernel command line"
[ -f "/lower$job/job.sh" ] || fail "no job script /lower$job/job.sh"
mkdir -p $r/run/husk-testbed
cp "/lower$job/job.sh" $r/run/husk-testbed/job.sh || fail "cannot copy the job script"

echo "HUSK-TESTBED-BEGIN uptime=$(cut -d' ' -f1 /proc/uptime)"
# The root moves onto / (as switch_root does) before the chroot: the mount namespace's root is
# then the overlay, not this initramfs, and a process that joins a mount namespace (runc exec:
# setns lands on the namespace's root) sees a real root, as on a booted machine. This shell
# keeps the initramfs as its own root.
cd $r || fail "cannot enter the root"
mount --move . / || fail "cannot move the root onto /"
chroot . /bin/bash /run/husk-testbed/job.sh </dev/null
status=$?
echo "HUSK-TESTBED-EXIT=$status uptime=$(cut -d' ' -f1 /proc/uptime)"
trap - EXIT
reboot -f
sleep 60
