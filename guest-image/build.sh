#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Builds the husk guest image: a kernel (vmlinux, ELF, 64-bit Linux boot
# protocol) and an initramfs whose /init is husk-agent (static).
#
#   guest-image/build.sh [--agent PATH]
#
#   --agent PATH  use this husk-agent binary instead of building it
#
# There is no shell in the guest: the agent moves off the initramfs at boot, so
# tools put there would be unreachable anyway. To see into a guest: husk run
# --console-log FILE --kernel-args loglevel=7, the VMM's status (husk vmm --api
# SOCK status), and `husk agent exec` into a container.
#
# Results (HUSK_CACHE defaults to /var/cache/husk):
#   $HUSK_CACHE/kernel/<key>/vmlinux              key: sha256(source package version, fragment, lib/kernel.sh)
#   $HUSK_CACHE/initramfs/<key>/initramfs.cpio.gz key: sha256(agent binary, this script, lib/initramfs.sh,
#                                                 the kernel source version gen_init_cpio comes from)
#   $HUSK_CACHE/current/vmlinux, current/initramfs.cpio.gz   symlinks to the latest build
# The guest expects a command line like:
#   console=ttyS0 reboot=k panic=-1 quiet virtio_mmio.device=4K@0xd0000000:5 ...
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
# shellcheck disable=SC2034 # read by lib/common.sh
HUSK_LOG_TAG=guest-image
# shellcheck source=lib/common.sh
. "$HERE/lib/common.sh"
# shellcheck source=lib/kernel.sh
. "$HERE/lib/kernel.sh"
# shellcheck source=lib/initramfs.sh
. "$HERE/lib/initramfs.sh"

agent=
while (($#)); do
    case $1 in
    --agent)
        agent=$(realpath "${2:?--agent needs a path}")
        shift
        ;;
    -h | --help)
        sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
        exit 0
        ;;
    *) husk_die "unknown argument $1 (see --help)" ;;
    esac
    shift
done

start=$(husk_now)
mkdir -p "$HUSK_CACHE"
husk_ensure_packages gcc gzip file

# --- kernel ------------------------------------------------------------------
husk_kernel_build guest "$HERE/kernel/guest.config" "$HERE/kernel/guest-only.config"
vmlinux=$HUSK_KERNEL_VMLINUX

# --- husk-agent, static --------------------------------------------------------
if [[ -z $agent ]]; then
    command -v cargo >/dev/null || husk_die "cargo not found (install Rust with rustup)"
    agent_start=$(husk_now)
    husk_log "building husk-agent (static, release)"
    # One target directory per checkout: cargo names path crates' outputs the same in every
    # checkout and decides freshness by mtimes, so two checkouts sharing one would each take
    # the other's (older) build for fresh.
    target_dir=$HUSK_CACHE/cargo-target/$(printf '%s' "$REPO" | sha256sum | cut -c1-12)
    RUSTFLAGS="-C target-feature=+crt-static" cargo build --release -p husk-agent \
        --target x86_64-unknown-linux-gnu --target-dir "$target_dir" \
        --manifest-path "$REPO/Cargo.toml" >&2
    agent="$target_dir/x86_64-unknown-linux-gnu/release/husk-agent"
    husk_log "husk-agent built in $(husk_elapsed "$agent_start") s"
fi
[[ -x $agent ]] || husk_die "no executable husk-agent at $agent"
case $(file -b "$agent") in
*"statically linked"* | *"static-pie linked"*) ;;
*) husk_die "$agent is not statically linked: $(file -b "$agent")" ;;
esac

# --- initramfs -------------------------------------------------------------------
# The list of the archive, in gen_init_cpio format.
initramfs_list() {
    husk_initramfs_dirs /dev /proc /sys /sys/fs /sys/fs/cgroup /tmp /run
    echo "nod /dev/console 0600 0 0 c 5 1"
    echo "file /init $agent 0755 0 0"
}

variant=initramfs
key=$(
    {
        husk_hash_files "$agent" "${BASH_SOURCE[0]}" "$HERE/lib/initramfs.sh"
        echo "gen_init_cpio $(husk_gen_init_cpio_version)"
        initramfs_list | sed "s|$agent|husk-agent|"
    } | sha256sum | cut -d' ' -f1
)
initramfs="$HUSK_CACHE/initramfs/$key/initramfs.cpio.gz"
if [[ -f $initramfs ]]; then
    husk_log "initramfs: cached $initramfs"
else
    mkdir -p "$HUSK_CACHE/initramfs"
    tmp=$(mktemp -d "$HUSK_CACHE/initramfs/.tmp.$key.XXXXXX")
    initramfs_list >"$tmp/list"
    husk_gen_init_cpio "$tmp/list" "$tmp/initramfs.cpio.gz"
    rm -rf "$HUSK_CACHE/initramfs/$key"
    mv "$tmp" "$HUSK_CACHE/initramfs/$key"
fi

# --- current ----------------------------------------------------------------------
# Relative symlinks, replaced atomically (rename over the old link).
link_current() {
    local target=$1 name=$2 tmp="$HUSK_CACHE/current/.tmp.$2.$$"
    mkdir -p "$HUSK_CACHE/current"
    ln -sfn "../${target#"$HUSK_CACHE"/}" "$tmp"
    mv -fT "$tmp" "$HUSK_CACHE/current/$name"
}
link_current "$vmlinux" vmlinux
link_current "$initramfs" "$variant.cpio.gz"

husk_log "vmlinux:   $vmlinux, $(husk_size "$vmlinux")"
husk_log "initramfs: $initramfs, $(husk_size "$initramfs")"
husk_log "agent:     $agent, $(husk_size "$agent")"
husk_log "current:   $HUSK_CACHE/current/vmlinux, $HUSK_CACHE/current/$variant.cpio.gz"
husk_log "done in $(husk_elapsed "$start") s"
