#!/usr/bin/env bash
# The main job, on a fresh machine, as root: install what is needed, build husk and the guest
# image, make a busybox rootfs, and run a container in a microVM with `husk run`, directly
# where /dev/kvm has hardware virtualization, otherwise inside the nested-KVM testbed.
#
#   bash scripts/demo.sh [COMMAND...]     (default: a few lines about the microVM)
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD

bash scripts/setup.sh
cargo build --workspace --locked
bash guest-image/build.sh

rootfs=$repo/target/demo-rootfs
bash scripts/busybox-rootfs.sh "$rootfs"

if (($#)); then
    cmd=("$@")
else
    # shellcheck disable=SC2016 # expanded by the container's shell
    cmd=(sh -c 'echo "hello from a husk microVM"; echo "kernel: $(uname -r)"; echo "cgroup: $(cat /proc/self/cgroup)"; echo "processes:"; ps -o pid,comm')
fi
run=("$repo/target/debug/husk" run --timings "$rootfs" -- "${cmd[@]}")
if grep -qwE 'vmx|svm' /proc/cpuinfo && [[ -c /dev/kvm ]]; then
    exec "${run[@]}"
fi
echo "demo: this host's KVM has no vmx/svm (e.g. PVM); running inside the nested-KVM testbed" >&2
exec tests/testbed/run.sh --timeout 900 -- "${run[@]}"
