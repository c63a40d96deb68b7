#!/usr/bin/env bash
# A loop of execs into husk pods in the nested-KVM testbed (tests/scripts/exec-loop.sh): the
# soak's exec steps without the boots in between, to reproduce a hang of one quickly.
# Release builds, as root after scripts/setup.sh.
#
#   bash scripts/exec-loop.sh [ROUNDS] [PODS]  (default 500 rounds of 4 pods, 2 execs each)
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
rounds=${1:-500} pods=${2:-4}
cargo build --release --locked -p husk -p husk-vmm -p containerd-shim-husk-v2
bash guest-image/build.sh
exec tests/testbed/run.sh --mem $((2048 + pods * 256)) --timeout $((900 + rounds * pods * 10)) -- \
    bash "$repo/tests/scripts/exec-loop.sh" "$repo" "$repo/target/release/husk" "$rounds" "$pods"
