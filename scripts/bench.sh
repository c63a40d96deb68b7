#!/usr/bin/env bash
# Benchmarks that print numbers (never pass/fail on them), as root, after scripts/setup.sh:
# release builds of husk and husk-vmm, the guest image, then inside the nested-KVM testbed
# (or directly where /dev/kvm has vmx/svm): vsock stdio throughput beside a Unix-socket copy;
# in the testbed also container create+start against image size and pod-to-pod TCP throughput
# and request/response latency, volumes' throughput and small-file costs, husk beside runc,
# what confining the VMM costs, VMs and pods restored from a template beside cold boots, and what an
# idle pod costs the node beside a runc pod.
# First, on this host: what converting a layer into the layer cache costs, beside cp -a.
# Where the testbed is used: its boot and a `husk run` in it with 1 and with 2 L1 vCPUs.
#
#   bash scripts/bench.sh [SIZE_MIB]
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
cargo build --release --locked -p husk -p husk-vmm
bash guest-image/build.sh

rootfs=$repo/target/bench-rootfs
bash scripts/busybox-rootfs.sh "$rootfs"
echo "== layer conversion (a layer's first use on a node), beside cp -a"
cargo run --release --locked -q -p husk --example pack-bench -- "$rootfs"
echo "== vsock stdio throughput"
bench=(bash "$repo/tests/bench/vsock-throughput.sh" "$repo" "$rootfs" "${1:-256}")
if grep -qwE 'vmx|svm' /proc/cpuinfo && [[ -c /dev/kvm ]]; then
    exec "${bench[@]}"
fi
echo "bench: no vmx/svm here; running inside the nested-KVM testbed" >&2
echo "== testbed: L1 boot and one husk run, with 1 and 2 L1 vCPUs (multi-threaded TCG)"
for cpus in 1 2 1 2; do
    start=$(date +%s%N)
    out=$(tests/testbed/run.sh --cpus "$cpus" --timeout 600 -- \
        "$repo/target/release/husk" run --timings "$rootfs" -- echo hi 2>&1)
    wall=$((($(date +%s%N) - start) / 1000000))
    printf 'cpus=%s: %s; %s; %s; testbed wall %s ms\n' "$cpus" \
        "$(grep -o 'L1 booted in [0-9.]*s' <<<"$out")" \
        "$(grep -o 'guest ready after [0-9]* ms' <<<"$out")" \
        "$(grep -o 'first output [0-9]* ms' <<<"$out")" "$wall"
done
tests/testbed/run.sh --timeout 1500 -- "${bench[@]}"
echo "== what confining the VMM costs: husk run confined and unconfined, in alternation"
tests/testbed/run.sh --timeout 900 -- bash "$repo/tests/bench/jail.sh" "$repo" "$rootfs" 6
echo "== VM templates: 10 VMs restored from one template beside 10 cold boots (ready time, memory)"
tests/testbed/run.sh --mem 4096 --timeout 1200 -- bash "$repo/tests/bench/template.sh" "$repo" 10 128
cargo build --release --locked -p containerd-shim-husk-v2
echo "== VM templates through containerd: 10 pods started from a template beside 10 that boot (ready time, memory)"
tests/testbed/run.sh --mem 4096 --timeout 1500 -- bash "$repo/tests/bench/pod-template.sh" "$repo" 10
echo "== container create+start against image size (containerd): husk beside runc"
for size in 16 256 1024; do
    out=$repo/target/bench-layers/$size
    [[ -f $out/image.tar ]] && continue
    rm -rf "$out" && mkdir -p "$out/data/bench"
    for ((i = 0; i < size; i++)); do head -c 1M /dev/urandom >"$out/data/bench/f$i"; done
    (. tests/scripts/cri-env.sh && oci_layers "$out" "docker.io/husk/bench-$size:1" '["/bin/sh"]' "$rootfs" "$out/data")
    rm -rf "$out/data" "$out/oci"
done
tests/testbed/run.sh --mem 8192 --timeout 1800 -- \
    bash "$repo/tests/bench/layers.sh" "$repo" "$repo/target/bench-layers" 16 256 1024
echo "== pod-to-pod networking (containerd, CNI bridge): husk beside runc"
tests/testbed/run.sh --timeout 1500 -- bash "$repo/tests/bench/net-pods.sh" "$repo" 32 20 2
echo "== what a pod costs the node beyond its container (the RuntimeClass's overhead): husk beside runc"
tests/testbed/run.sh --mem 4096 --timeout 900 -- bash "$repo/tests/bench/overhead.sh" "$repo" 3 20
echo "== volumes (containerd): husk's virtio-fs beside runc's bind mount"
exec tests/testbed/run.sh --mem 4096 --timeout 1500 -- bash "$repo/tests/bench/volumes.sh" "$repo" 256 10000 2
