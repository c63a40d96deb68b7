#!/usr/bin/env bash
# The vsock benchmark for several husk-vmm builds, interleaved in one testbed run so that all
# see the same L1 and the same host load: each round measures every VMM once, in the order
# given (e.g. the build before a change, then the current one). Run INSIDE the nested-KVM
# testbed, e.g.
#   tests/testbed/run.sh --timeout 3000 -- bash tests/bench/vsock-compare.sh \
#       "$PWD" target/bench-rootfs 256 3 /path/to/old/husk-vmm target/release/husk-vmm
# Usage: vsock-compare.sh REPO ROOTFS_DIR SIZE_MIB ROUNDS VMM...
set -euo pipefail
repo=$1 rootfs=$2 size=$3 rounds=$4
shift 4
for r in $(seq "$rounds"); do
    for vmm in "$@"; do
        echo "== round $r: $vmm"
        HUSK_BENCH_VMM=$vmm bash "$repo/tests/bench/vsock-throughput.sh" "$repo" "$rootfs" "$size" |
            grep -E 'vsock stdio|unix socket|ratio'
    done
done
