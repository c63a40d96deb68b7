#!/usr/bin/env bash
# The soak (numbers, never pass/fail on time), as root after scripts/setup.sh: release builds of
# husk, husk-vmm and the shim, the guest image, then inside the nested-KVM testbed
# tests/scripts/soak.sh: CYCLES cycles of INFLIGHT husk pods at once through containerd (runp,
# create, start, exec, logs, stop, rm, stopp, rmp; network, layers, a live volume), with an
# inventory of what could leak after every cycle, and pods/s sustained.
#
#   bash scripts/soak.sh [CYCLES] [INFLIGHT] [BURST]  (default 300 cycles of 4 pods, after a burst of 8)
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
cycles=${1:-300} inflight=${2:-4} burst=${3:-8}
cargo build --release --locked -p husk -p husk-vmm -p containerd-shim-husk-v2
bash guest-image/build.sh
# A cycle of 4 pods takes about a minute in the testbed (TCG); a generous bound on the whole.
exec tests/testbed/run.sh --mem $((2048 + (inflight > burst ? inflight : burst) * 256)) --timeout $((900 + (cycles * inflight + burst) * 60)) -- \
    bash "$repo/tests/scripts/soak.sh" "$repo" "$repo/target/release/husk" "$cycles" "$inflight" "$burst"
