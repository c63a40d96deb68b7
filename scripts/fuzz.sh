#!/usr/bin/env bash
# Fuzzes husk-vmm's guest-facing parsers with cargo-fuzz (libFuzzer, nightly Rust):
#   virtio_mmio_driver  a hostile driver programming a block or vsock device over virtio-mmio
#   vsock_packets       raw vsock packets into the device's packet handler
#   net_frames          guest virtio-net TX and RX chains (headers, offloads, lengths) into the device
#   virtiofs_requests   FUSE requests on virtio-fs chains into virtiofsd's server (the backend
#                       husk runs; root: the target jails itself in a mount namespace and chroot)
# SECS seconds each (default 60). A crash fails the run and leaves its input under
# runtime/vmm/fuzz/artifacts/. cargo-fuzz and the build are cached under $HUSK_CACHE.
#
#   bash scripts/fuzz.sh [SECS]
set -euo pipefail
cd "$(dirname "$0")/../runtime/vmm/fuzz"
secs=${1:-60}
cache=${HUSK_CACHE:-/var/cache/husk}
export PATH="$cache/tools/bin:$PATH"
if ! command -v cargo-fuzz >/dev/null; then
    echo "== installing cargo-fuzz into $cache/tools"
    cargo install --locked --root "$cache/tools" cargo-fuzz@0.13.1
fi
export CARGO_TARGET_DIR=$cache/fuzz-target
for t in virtio_mmio_driver vsock_packets net_frames virtiofs_requests; do
    echo "== fuzz $t for ${secs}s"
    mkdir -p "corpus/$t" "seeds/$t"
    log=$(mktemp)
    rc=0
    cargo +nightly fuzz run "$t" "corpus/$t" "seeds/$t" -- \
        -max_total_time="$secs" -rss_limit_mb=1024 -timeout=10 -print_final_stats=1 >"$log" 2>&1 || rc=$?
    grep -E '^(#[0-9]+.*DONE|stat::number_of_executed_units|stat::peak_rss_mb|SUMMARY)' "$log" || true
    if ((rc != 0)); then
        tail -n 60 "$log" >&2
        rm -f "$log"
        echo "fuzz $t failed (status $rc); a crashing input is under runtime/vmm/fuzz/artifacts/$t" >&2
        exit 1
    fi
    rm -f "$log"
done
