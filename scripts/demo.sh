#!/usr/bin/env bash
# The main job, on a fresh machine, as root: install what is needed, build husk (release) and
# the guest image, make a busybox rootfs, and run a container in a microVM with `husk run`,
# directly where /dev/kvm has hardware virtualization, otherwise inside the nested-KVM testbed.
# The release build goes to a target directory of its own in the build cache (as the guest
# agent's does), kept between runs: cargo rebuilds what changed.
#
#   bash scripts/demo.sh [COMMAND...]     (default: a few lines about the microVM)
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD

bash scripts/setup.sh
target_dir=${HUSK_CACHE:-/var/cache/husk}/cargo-target/$(printf '%s' "$repo" | sha256sum | cut -c1-12)-release
cargo build --release --locked -p husk -p husk-vmm -p containerd-shim-husk-v2 --target-dir "$target_dir"
bash guest-image/build.sh

rootfs=$repo/target/demo-rootfs
bash scripts/busybox-rootfs.sh "$rootfs"

if (($#)); then
    cmd=("$@")
else
    # shellcheck disable=SC2016 # expanded by the container's shell
    cmd=(sh -c 'echo "hello from a husk microVM"; echo "kernel: $(uname -r)"; echo "cgroup: $(cat /proc/self/cgroup)"; echo "processes:"; ps -o pid,comm')
fi
echo "demo: husk is $target_dir/release/husk (husk install puts it, the shim, husk-vmm and the guest image in system paths)" >&2
run=("$target_dir/release/husk" run --timings "$rootfs" -- "${cmd[@]}")
if grep -qwE 'vmx|svm' /proc/cpuinfo && [[ -c /dev/kvm ]]; then
    exec "${run[@]}"
fi
echo "demo: this host's KVM has no vmx/svm (e.g. PVM); running inside the nested-KVM testbed" >&2
exec tests/testbed/run.sh --timeout 900 -- "${run[@]}"
