#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Runs a command inside the nested-KVM testbed: a first-level VM (L1) under
# QEMU TCG `-cpu max` (nested SVM: /dev/kvm works inside), whose root is the
# host's root shared read-only over virtio-9p with a tmpfs overlay on top.
#
#   tests/testbed/run.sh [options] -- COMMAND [ARG...]
#
#   --timeout SECS     kill the VM after SECS (default 900); exit status 124
#   --mem MIB          L1 memory (default 2048)
#   --cpus N           L1 vCPUs (default 2)
#   --cwd DIR          working directory of COMMAND (default: the current one)
#   --env NAME=VALUE   extra environment for COMMAND (repeatable); COMMAND gets
#                      PATH HOME USER LANG HUSK_CACHE RUST_LOG RUST_BACKTRACE
#                      of the caller (when set) and TERM=dumb
#   --name NAME        QEMU's -name (default husk-testbed), to find the process
#   --l1-args ARGS     more L1 kernel command line, also from $HUSK_TESTBED_L1_ARGS
#                      (L1's KVM uses shadow paging unless HUSK_TESTBED_NPT=1: see below)
#   --status-file F    also write "exit N", "timeout SECS [deadline]" or "error MSG" to F
#   --verbose          show L1's boot messages and timings
#   --build-only       only build (or find in the cache) the L1 kernel and initramfs
#
# COMMAND runs as root in the L1 root, moved onto / (host files read-only,
# writes go to RAM and are lost), stdin /dev/null, stdout+stderr on the VM's
# serial console, which this script streams to its stdout. Exit status:
# COMMAND's, 124 on timeout (QEMU killed), 125 if the testbed itself failed.
#
# HUSK_TEST_DEADLINE (seconds since the epoch; scripts/test.sh sets it for CI) caps the
# timeout: a run never outlives the test run's deadline, so a hang fails its test with its
# last lines while there is time to say so. The command's progress lines (the lines of
# $HUSK_TESTBED_PROGRESS, an extended regular expression: by default the test scripts'
# section, case, fault, cycle and summary lines) are also copied to stderr as they come,
# "testbed| +SECS LINE", so a caller that holds stdout until the end (cargo test) still
# shows where a long run stands.
# Needs: root (or access to QEMU and the cache), qemu-system-x86,
# linux-source-6.12, busybox-static (installed with apt-get when missing).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
# shellcheck disable=SC2034 # read by lib/common.sh
HUSK_LOG_TAG=testbed
# shellcheck source=../../guest-image/lib/common.sh
. "$REPO/guest-image/lib/common.sh"
# shellcheck source=../../guest-image/lib/kernel.sh
. "$REPO/guest-image/lib/kernel.sh"
# shellcheck source=../../guest-image/lib/initramfs.sh
. "$REPO/guest-image/lib/initramfs.sh"

timeout=900 mem=2048 cpus=2 cwd=$PWD verbose=0 build_only=0 status_file='' name=husk-testbed
l1_args=${HUSK_TESTBED_L1_ARGS:-}
envs=()
usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }
while (($#)); do
    case $1 in
    --timeout) timeout=${2:?} && shift ;;
    --mem) mem=${2:?} && shift ;;
    --cpus) cpus=${2:?} && shift ;;
    --cwd) cwd=${2:?} && shift ;;
    --env) envs+=("${2:?}") && shift ;;
    --status-file) status_file=${2:?} && shift ;;
    --name) name=${2:?} && shift ;;
    --l1-args) l1_args=${2:?} && shift ;;
    --verbose) verbose=1 ;;
    --build-only) build_only=1 ;;
    -h | --help) usage && exit 0 ;;
    --) shift && break ;;
    *) usage >&2 && exit 2 ;;
    esac
    shift
done
((build_only || $# > 0)) || { usage >&2 && exit 2; }
deadline_note=''
if [[ -n ${HUSK_TEST_DEADLINE:-} ]] && ((!build_only)); then
    left=$((HUSK_TEST_DEADLINE - $(date +%s)))
    if ((left < 30)); then
        husk_log "the test run's deadline (HUSK_TEST_DEADLINE) has passed: not starting"
        [[ -z $status_file ]] || echo "error the test run's deadline (HUSK_TEST_DEADLINE) had passed" >"$status_file"
        exit 125
    fi
    if ((left < timeout)); then
        timeout=$left
        deadline_note=" (cut to what was left before the test run's deadline, HUSK_TEST_DEADLINE)"
    fi
fi
progress=${HUSK_TESTBED_PROGRESS:-'^(=== |case |fault |warm-up pod: |burst: |cycle-[0-9]+: |soak: |stall: |critest |.* pod [0-9]+: failed at )'}

reported=0
result() { # result STATUS-LINE
    reported=1
    [[ -z $status_file ]] || printf '%s\n' "$1" >"$status_file"
}
job='' timeout_pid='' awk_pid='' watch_pid=''
# shellcheck disable=SC2317 # called by the EXIT trap
on_exit() {
    local status=$? pid
    # Never leave a QEMU behind (timeout, Ctrl-C, errors of this script).
    [[ -n $timeout_pid ]] && kill -TERM "$timeout_pid" 2>/dev/null
    [[ -n $awk_pid ]] && kill -TERM "$awk_pid" 2>/dev/null
    [[ -n $watch_pid ]] && kill -TERM "$watch_pid" 2>/dev/null
    if [[ -n $job && -f $job/qemu.pid ]]; then
        pid=$(cat "$job/qemu.pid" 2>/dev/null || true)
        if [[ -n $pid ]] && grep -qaF "$job" "/proc/$pid/cmdline" 2>/dev/null; then
            kill -KILL "$pid" 2>/dev/null
        fi
    fi
    [[ -n $job ]] && rm -rf "$job"
    if ((!reported && !build_only)); then
        [[ -z $status_file ]] || printf 'error testbed setup failed (status %s)\n' "$status" >"$status_file"
        exit 125
    fi
}
trap on_exit EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- L1 kernel and initramfs (cached) -------------------------------------------
husk_ensure_packages qemu-system-x86 busybox-static gcc gzip
husk_kernel_build l1 "$REPO/guest-image/kernel/guest.config" "$HERE/l1.config"
vmlinux=$HUSK_KERNEL_VMLINUX

l1_list() {
    husk_initramfs_dirs /dev /proc /sys /tmp /run /bin
    echo "nod /dev/console 0600 0 0 c 5 1"
    echo "file /init $HERE/init.sh 0755 0 0"
    echo "file /bin/busybox /bin/busybox 0755 0 0"
}
key=$(
    {
        husk_hash_files /bin/busybox "$HERE/init.sh" "${BASH_SOURCE[0]}" "$REPO/guest-image/lib/initramfs.sh"
        echo "gen_init_cpio $(husk_gen_init_cpio_version)"
    } | sha256sum | cut -d' ' -f1
)
initrd="$HUSK_CACHE/testbed/initramfs/$key/l1.cpio.gz"
if [[ ! -f $initrd ]]; then
    mkdir -p "$HUSK_CACHE/testbed/initramfs"
    tmp=$(mktemp -d "$HUSK_CACHE/testbed/initramfs/.tmp.$key.XXXXXX")
    l1_list >"$tmp/list"
    husk_gen_init_cpio "$tmp/list" "$tmp/l1.cpio.gz"
    rm -rf "$HUSK_CACHE/testbed/initramfs/$key"
    mv "$tmp" "$HUSK_CACHE/testbed/initramfs/$key"
fi
if ((build_only)); then
    husk_log "L1 kernel:    $vmlinux"
    husk_log "L1 initramfs: $initrd"
    exit 0
fi

# --- the job -------------------------------------------------------------------------
# A directory on the host (so L1 sees it through 9p) holding the job script.
mkdir -p "$HUSK_CACHE/testbed/jobs"
job=$(mktemp -d "$HUSK_CACHE/testbed/jobs/job.XXXXXX")

env_args=(TERM=dumb)
for var in PATH HOME USER LANG HUSK_CACHE RUST_LOG RUST_BACKTRACE; do
    [[ -n ${!var:-} ]] && env_args+=("$var=${!var}")
done
env_args+=("${envs[@]}")
{
    echo '#!/bin/bash'
    printf 'cd -- %q || exit 126\n' "$cwd"
    printf 'exec env -i'
    printf ' %q' "${env_args[@]}" "$@"
    echo
} >"$job/job.sh"

# --- boot L1 -------------------------------------------------------------------------
# L1's TSC is the host's (TCG's rdtsc reads the host TSC), but L1 cannot calibrate it: its
# only reference is an emulated PIT, and on a busy host the PIT calibration fails ("Marking
# TSC unstable due to could not calculate TSC khz"). With tsc_khz 0, L1's KVM never enters a
# guest: every vCPU spins in the kvmclock update (KVM_RUN never returns, the guest never runs
# its first instruction). So L1 is told the host's TSC frequency, and that its TSC is
# reliable (it is the host's: better than anything emulated).
host_tsc_khz() {
    local mhz
    mhz=$(dmesg 2>/dev/null | sed -n 's/.*tsc: Refined TSC clocksource calibration: \([0-9.]*\) MHz.*/\1/p' | tail -1)
    [[ -n $mhz ]] || mhz=$(dmesg 2>/dev/null | sed -n 's/.*tsc: Detected \([0-9.]*\) MHz processor.*/\1/p' | tail -1)
    [[ -n $mhz ]] || mhz=$(awk -F': *' '/^cpu MHz/ { print $2; exit }' /proc/cpuinfo)
    [[ -n $mhz ]] && awk -v m="$mhz" 'BEGIN { printf "%d", m * 1000 }'
}
tsc_khz=$(host_tsc_khz || true)
cmdline="console=ttyS0 quiet loglevel=1 panic=-1 reboot=t husk.job=$job husk.time=$(date +%s)"
if [[ -n $tsc_khz && $tsc_khz -gt 0 ]]; then
    cmdline+=" tsc_early_khz=$tsc_khz tsc=reliable"
else
    husk_log "warning: the host's TSC frequency is unknown; L1 calibrates it (may fail on a busy host)"
fi
# L1's KVM runs its guests with shadow paging, not nested paging: with nested paging, QEMU
# TCG's emulation of it (L0) now and then hands a microVM a wrong translation under load, and
# the guest kernel triple-faults on an instruction fetch from a page that is not present
# (husk-vmm 6 of 370 boots, QEMU/KVM in place of husk-vmm 1 of 80; with shadow paging 0 of
# 160, at the same speed: tests/scripts/lost-vm-loop.sh and boot-compare.sh). Real hosts have
# hardware nested paging; HUSK_TESTBED_NPT=1 brings the emulated one back to study it.
[[ ${HUSK_TESTBED_NPT:-0} == 1 ]] || cmdline+=" kvm_amd.npt=0"
[[ -n $l1_args ]] && cmdline+=" $l1_args"
((verbose)) && cmdline=${cmdline/ quiet loglevel=1/}
# shellcheck disable=SC2054 # QEMU options use commas
qemu=(
    qemu-system-x86_64
    -M microvm,x-option-roms=off,rtc=off,acpi=off
    -accel tcg,thread=multi -cpu max -smp "$cpus" -m "$mem"
    -name "$name" -nodefaults -no-user-config -display none -no-reboot
    -chardev "stdio,id=console,signal=off,logfile=$job/raw-console.log" -serial chardev:console
    -kernel "$vmlinux" -initrd "$initrd" -append "$cmdline"
    -fsdev local,id=hostroot,path=/,security_model=none,readonly=on,multidevs=remap
    -device virtio-9p-device,fsdev=hostroot,mount_tag=hostroot
    -pidfile "$job/qemu.pid"
)
# L1 now and then hangs in its own boot, before the command begins (under TCG; seen stuck in
# the kernel's initcalls, QEMU busy, nothing more on the console): nothing of the command has
# run, so a boot that has not begun it within $boot_secs is killed and L1 booted again, at
# most $boot_tries times in all.
boot_secs=${HUSK_TESTBED_BOOT_SECS:-120} boot_tries=3 end_secs=30
# mawk (Debian's awk) reads a pipe in blocks: without -W interactive the console's lines reach
# the log and the caller late, and the watchdog would not see BEGIN.
# (Not `awk -W version | grep -q mawk` under pipefail: grep quits at the first line, mawk's
# later writes then fail with EPIPE, and the pipeline failed 1 time in 300 on an idle host,
# leaving a buffered filter for the whole run: the watchdog then missed BEGIN and killed three
# boots of a running command, as CI saw.)
awk_line=(awk)
awk_version=$(awk -W version 2>&1 || true)
[[ $awk_version == *mawk* ]] && awk_line=(awk -W interactive)
# For tests/tests/testbed.rs: the filter that race gave, buffered.
[[ ${HUSK_TESTBED_BUFFERED_FILTER:-} == 1 ]] && awk_line=(awk)
start=$(husk_now)
for ((try = 1; ; try++)); do
    rm -f "$job/console" "$job/console.log" "$job/raw-console.log" "$job/begun" "$job/ended" \
        "$job/qemu.pid" "$job/boot-hang" "$job/end-hang"
    mkfifo "$job/console"
    touch "$job/console.log"
    left=$((timeout - $(date +%s) + ${start%.*}))
    ((left > 0)) || left=1
    # QEMU in the background (so this shell can kill it), its console through a
    # filter: lines before BEGIN are L1 boot noise (shown with --verbose), lines
    # between BEGIN and EXIT are the command's output. Both in the background:
    # bash runs the INT/TERM traps during `wait`, not during a foreground job.
    timeout -k 5 "$left" "${qemu[@]}" </dev/null >"$job/console" 2>"$job/qemu.err" &
    timeout_pid=$!
    set +e
    # (srand() returns the seed before, the time of day of the last call: mawk has no systime.)
    # shellcheck disable=SC2016 # the $ are awk's
    "${awk_line[@]}" -v verbose="$verbose" -v logfile="$job/console.log" -v begun="$job/begun" \
        -v ended="$job/ended" -v progress="$progress" '
        function now() { srand(); return srand() }
        { sub(/\r$/, ""); print > logfile }
        /^HUSK-TESTBED-BEGIN/ {
            inside = 1; t0 = now(); fflush(logfile); printf "" > begun; close(begun)
            if (verbose) print > "/dev/stderr"
            next
        }
        /^HUSK-TESTBED-(EXIT|ERROR)=/ {
            inside = 0; fflush(logfile); printf "" > ended; close(ended)
            if (verbose) print > "/dev/stderr"
            next
        }
        inside && $0 ~ progress {
            printf "testbed| +%ds %s\n", now() - t0, substr($0, 1, 240) > "/dev/stderr"
            fflush("/dev/stderr")
        }
        inside { print; fflush(); next }
        verbose { print > "/dev/stderr"; fflush("/dev/stderr") }
    ' <"$job/console" &
    awk_pid=$!
    # The boot's watchdog: the command has begun once the filter saw BEGIN (it makes
    # $job/begun) or QEMU's own copy of the console, written as the guest writes it, holds it.
    # Not the filter's log alone, which depends on the filter reading line by line.
    # Then the end's: once the command has ended (EXIT or ERROR on the console), L1 reboots
    # at once (reboot -f); a QEMU still there after $end_secs is killed, the command's status
    # already known, instead of waiting out the whole timeout.
    (
        for ((i = 0; ; i++)); do
            sleep 1
            kill -0 "$timeout_pid" 2>/dev/null || exit 0
            [[ -e $job/begun ]] && break
            grep -aq 'HUSK-TESTBED-BEGIN' "$job/raw-console.log" 2>/dev/null && break
            if ((i >= boot_secs)); then
                touch "$job/boot-hang"
                kill -KILL "$(cat "$job/qemu.pid")" 2>/dev/null
                exit 0
            fi
        done
        for ((i = 0; ; i++)); do
            sleep 1
            kill -0 "$timeout_pid" 2>/dev/null || exit 0
            [[ -e $job/ended ]] && break
            ((i % 10 == 9)) && grep -aqE '^HUSK-TESTBED-(EXIT|ERROR)=' "$job/raw-console.log" 2>/dev/null && break
        done
        for ((i = 0; i < end_secs; i++)); do
            sleep 1
            kill -0 "$timeout_pid" 2>/dev/null || exit 0
        done
        touch "$job/end-hang"
        kill -KILL "$(cat "$job/qemu.pid")" 2>/dev/null
    ) &
    watch_pid=$!
    wait "$timeout_pid" 2>/dev/null
    qemu_status=$?
    wait "$awk_pid"
    kill "$watch_pid" 2>/dev/null
    wait "$watch_pid" 2>/dev/null
    set -e
    timeout_pid='' awk_pid='' watch_pid=''
    if [[ ! -f $job/boot-hang ]] || ((try == boot_tries)); then
        break
    fi
    husk_log "L1 did not begin the command within ${boot_secs}s of its boot (console's last line: $(tail -n 1 "$job/console.log" 2>/dev/null)); booting it again ($((try + 1)) of $boot_tries)"
done
elapsed=$(husk_elapsed "$start")

show_log() {
    husk_log "--- L1 console (last 40 lines) ---"
    tail -n 40 "$job/console.log" >&2 || true
    husk_log "--- QEMU stderr ---"
    cat "$job/qemu.err" >&2 || true
}
exit_line=$(grep -a -m1 '^HUSK-TESTBED-EXIT=' "$job/console.log" || true)
error_line=$(grep -a -m1 '^HUSK-TESTBED-ERROR=' "$job/console.log" || true)
if [[ -f $job/boot-hang ]]; then
    husk_log "testbed failed: L1 hung in its boot $boot_tries times (each killed after ${boot_secs}s)"
    show_log
    result "error L1 hung in its boot $boot_tries times"
    exit 125
elif [[ -n $exit_line ]]; then
    status=${exit_line#HUSK-TESTBED-EXIT=}
    status=${status%% *}
    begin=$(grep -a -m1 '^HUSK-TESTBED-BEGIN' "$job/console.log" | sed 's/.*uptime=//')
    husk_log "L1 booted in ${begin}s (its uptime when the command began); whole run ${elapsed}s, status $status; ended $(date +%T)"
    [[ -f $job/end-hang ]] && husk_log "L1 did not end within ${end_secs}s of its command's end: QEMU killed"
    result "exit $status"
    exit "$status"
elif ((qemu_status == 124 || qemu_status == 137)); then
    husk_log "timeout after ${timeout}s${deadline_note}: QEMU killed at $(date +%T)"
    ((verbose)) && show_log
    result "timeout $timeout${deadline_note:+ deadline}"
    exit 124
elif [[ -n $error_line ]]; then
    husk_log "testbed failed: ${error_line#HUSK-TESTBED-ERROR=}"
    show_log
    result "error ${error_line#HUSK-TESTBED-ERROR=}"
    exit 125
else
    husk_log "testbed failed: L1 ended (QEMU status $qemu_status) without reporting an exit status"
    # L1's kernel crashing (nested SVM under TCG now and then corrupts L1: seen as an oops in
    # a husk-vmm vCPU thread's page fault, then a double fault on the other CPU) ends L1 this
    # way, its oops the last thing on the console: said plainly, as the testbed's failure.
    oops=$(tail -n 200 "$job/console.log" | grep -a -m1 -E '^(BUG: |Oops: |general protection fault|kernel BUG|Kernel panic - not syncing)' || true)
    if [[ -n $oops ]]; then
        comm=$(tail -n 200 "$job/console.log" | grep -a -m1 -oE 'Comm: [^ ]+' || true)
        husk_log "L1's own kernel crashed (the console's last lines: \"$oops\"${comm:+, in $comm}): a failure of the testbed, not of a husk guest"
    fi
    show_log
    result "error L1 ended without an exit status (QEMU status $qemu_status)"
    exit 125
fi
