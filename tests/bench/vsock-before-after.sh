#!/usr/bin/env bash
# The vsock benchmark for two husk-vmm builds, interleaved in one testbed run (so that both
# see the same L1 and the same host load): ROUNDS times the "before" VMM, then the current one.
# Run INSIDE the nested-KVM testbed, e.g.
#   tests/testbed/run.sh --timeout 3000 -- bash tests/bench/vsock-before-after.sh \
#       "$PWD" target/bench-rootfs /path/to/old/husk-vmm 256 3
# Usage: vsock-before-after.sh REPO ROOTFS_DIR BEFORE_VMM [SIZE_MIB] [ROUNDS]
set -euo pipefail
repo=$1 rootfs=$2 before=$3 size=${4:-256} rounds=${5:-3}
for r in $(seq "$rounds"); do
    for which in before after; do
        vmm=$before
        [[ $which == after ]] && vmm=$repo/target/release/husk-vmm
        echo "== round $r: $which"
        HUSK_BENCH_VMM=$vmm bash "$repo/tests/bench/vsock-throughput.sh" "$repo" "$rootfs" "$size" |
            grep -E 'vsock stdio|unix socket|ratio'
    done
done
