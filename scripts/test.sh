#!/usr/bin/env bash
# Runs every check and test of husk. Needs root (namespaces, mounts, cgroups, KVM) and the
# packages of scripts/setup.sh. Kernel and image builds are cached under $HUSK_CACHE
# (default /var/cache/husk), keyed by content hash, so a second run reuses them.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ $(id -u) -ne 0 ]]; then
    echo "test.sh: the tests need root (namespaces, mounts, cgroups, /dev/kvm)" >&2
    exit 1
fi

echo "== format and lints"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
shellcheck -x .ci/run scripts/*.sh guest-image/build.sh guest-image/lib/*.sh tests/scripts/*.sh \
    tests/testbed/*.sh tests/bench/*.sh

echo "== build"
cargo build --workspace --locked

echo "== guest image (cached by content hash under \$HUSK_CACHE)"
bash guest-image/build.sh

echo "== fuzz husk-vmm's guest-facing parsers (cargo-fuzz, nightly)"
bash scripts/fuzz.sh "${HUSK_FUZZ_SECS:-45}"

echo "== tests"
# --show-output: the numbers passing tests print (boot breakdown, memory, ratios to runc).
# A failure's panic messages are printed again at the end, where CI's tail shows them.
test_log=$(mktemp)
trap 'rm -f "$test_log"' EXIT
if ! cargo test --workspace --locked --no-fail-fast -- --test-threads="${HUSK_TEST_THREADS:-2}" \
    --show-output 2>&1 | tee "$test_log"; then
    echo "== what failed (each panic's first 40 lines; the whole output is above)"
    awk '/^thread .* panicked at / {n = 40} n > 0 {print; n--}' "$test_log"
    grep -A 20 '^error: .* target.* failed' "$test_log"
    exit 1
fi

echo "== the README's main job (scripts/demo.sh)"
demo_out=$(bash scripts/demo.sh 2>&1) || { echo "$demo_out"; echo "demo.sh failed" >&2; exit 1; }
echo "$demo_out" | tail -n 12
grep -q "hello from a husk microVM" <<<"$demo_out" || { echo "demo.sh did not run its container" >&2; exit 1; }
