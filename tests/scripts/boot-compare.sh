#!/usr/bin/env bash
# Boots the husk guest image with husk-vmm and with QEMU/KVM side by side, INSIDE the
# nested-KVM testbed, to tell a husk-vmm fault from one of the testbed:
#   tests/testbed/run.sh --timeout 3600 -- tests/scripts/boot-compare.sh REPO [ROUNDS]
# Each round boots 2 VMs with each VMM at once (1 vCPU, 256 MiB, no devices, the same kernel
# command line) and stops each once the agent says "ready" on the console; one that ends
# before that crashed (husk-vmm also says "triple fault"), one still booting after
# BOOT_LIMIT seconds (default 300) hung. Prints the counts per VMM.
set -uo pipefail
repo=$1 rounds=${2:-10}
vmm=$repo/target/debug/husk-vmm
cache=${HUSK_CACHE:-/var/cache/husk}/current
cmdline="console=ttyS0 reboot=k panic=-1 pci=off 8250.nr_uarts=1 i8042.noaux i8042.nomux i8042.dumbkbd tsc=reliable quiet"
out=$(mktemp -d /run/boot-compare.XXXXXX)

boot() { # boot husk|qemu NAME: writes ready, ended (before ready: crashed) or hung to NAME.result
    local f=$out/$2 pid deadline=$((SECONDS + ${BOOT_LIMIT:-300}))
    case $1 in
    husk)
        "$vmm" --kernel "$cache/vmlinux" --initramfs "$cache/initramfs.cpio.gz" \
            --vcpus 1 --mem-mib 256 --serial-log "$f.console" >"$f.vmm" 2>&1 &
        ;;
    qemu)
        # shellcheck disable=SC2054 # QEMU options use commas
        qemu-system-x86_64 -M microvm,x-option-roms=off,rtc=off,acpi=off \
            -accel kvm -cpu host -smp 1 -m 256 -nodefaults -no-user-config -display none \
            -no-reboot -serial "file:$f.console" -kernel "$cache/vmlinux" \
            -initrd "$cache/initramfs.cpio.gz" -append "$cmdline" >"$f.vmm" 2>&1 &
        ;;
    esac
    pid=$!
    while ((SECONDS < deadline)) && kill -0 "$pid" 2>/dev/null; do
        grep -q ' ready' "$f.console" 2>/dev/null && break
        sleep 0.5
    done
    if grep -q ' ready' "$f.console" 2>/dev/null; then
        echo ready >"$f.result"
    elif kill -0 "$pid" 2>/dev/null; then
        echo hung >"$f.result"
    else
        echo ended >"$f.result"
    fi
    kill -TERM "$pid" 2>/dev/null
    wait "$pid"
}

declare -A good=([husk]=0 [qemu]=0) crashed=([husk]=0 [qemu]=0)
for ((r = 1; r <= rounds; r++)); do
    for n in 1 2; do
        boot husk "husk-$r-$n" &
        boot qemu "qemu-$r-$n" &
    done
    wait
    for n in 1 2; do
        for v in husk qemu; do
            f=$out/$v-$r-$n
            if [[ $(cat "$f.result") == ready ]]; then
                good[$v]=$((good[$v] + 1))
            else
                crashed[$v]=$((crashed[$v] + 1))
                echo "--- $v round $r boot $n: $(cat "$f.result") before the agent was ready"
                tail -n 5 "$f.vmm" "$f.console"
            fi
        done
    done
    echo "round $r: husk-vmm ${good[husk]} good ${crashed[husk]} crashed; qemu ${good[qemu]} good ${crashed[qemu]} crashed"
done
rm -rf "$out"
echo "boot-compare: husk-vmm ${good[husk]} good ${crashed[husk]} crashed; qemu ${good[qemu]} good ${crashed[qemu]} crashed"
