#!/usr/bin/env bash
# Installs what husk needs to build and test on a fresh Debian 12 machine (as root):
# Debian packages for the guest kernel build, the nested-KVM testbed and the tests.
# Idempotent: a second run installs nothing new.
set -euo pipefail

PACKAGES=(
    # guest and testbed kernels
    linux-source-6.12 bc bison flex libelf-dev libssl-dev cpio xz-utils kmod build-essential
    # the testbed (nested KVM under TCG) and guest images
    qemu-system-x86 busybox-static e2fsprogs erofs-utils
    # containerd integration and the runc peer in benchmarks
    containerd runc containernetworking-plugins iproute2
    # test tools
    procps psmisc util-linux shellcheck
)

missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    echo "setup: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
echo "setup: system packages present"
