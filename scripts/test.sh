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

echo "== format and lints ($(date +%T))"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
shellcheck -x .ci/run scripts/*.sh guest-image/build.sh guest-image/lib/*.sh tests/scripts/*.sh \
    tests/testbed/*.sh tests/bench/*.sh

echo "== build ($(date +%T))"
cargo build --workspace --locked

echo "== guest image (cached by content hash under \$HUSK_CACHE) ($(date +%T))"
bash guest-image/build.sh

echo "== fuzz husk-vmm's guest-facing parsers (cargo-fuzz, nightly) ($(date +%T))"
bash scripts/fuzz.sh "${HUSK_FUZZ_SECS:-45}"

# The failed tests of a `cargo test` log, for CI, which keeps only the last 2 KB or so of the
# output: each failed test's panic message (its first 20 and last 10 lines, each cut at 300
# characters), then the same in short (the first 4 lines, cut at 160), the testbed's own
# complaints (its stderr lines, but for the routine ones) and cargo's list of failed targets.
# Only the blocks under cargo's "failures:" count: should_panic tests that passed are left out.
failure_summary() {
    local panics
    panics=$(awk '
        /^(failures|successes):$/ { failing = ($0 == "failures:"); grab = 0; next }
        /^---- .* stdout ----$/ { grab = 0; if (failing) print; next }
        /^test result: / { failing = 0; grab = 0; next }
        failing && /^thread .* panicked at / { grab = 1; next }
        grab && /^(note: run with|stack backtrace:)/ { grab = 0; next }
        grab { print "  " $0 }
    ' "$1")
    awk '
        function cut(l) { return length(l) > 300 ? substr(l, 1, 300) "[...]" : l }
        function flush(  i) {
            for (i = 1; i <= n; i++)
                if (i <= 20 || i > n - 10) print cut(msg[i]); else if (i == 21) print "  [...]"
            n = 0
        }
        /^---- / { flush(); print; next }
        { msg[++n] = $0 }
        END { flush() }
    ' <<<"$panics"
    echo "== in short"
    awk '/^---- / { n = 0; print; next } ++n <= 4 { print (length($0) > 160 ? substr($0, 1, 160) "[...]" : $0) }' \
        <<<"$panics"
    grep -a '^testbed: ' "$1" | grep -av -e 'testbed: kernel l1: cached' -e 'L1 booted in' || true
    grep -a -A 20 '^error: .* target.* failed' "$1" || true
}

# The test binaries that ran at least 5 s, failed or never finished, with their times, from a
# `cargo test` log: where the time went, in a few lines at the end.
test_times() {
    awk '
        function done(result) {
            if (name != "" && (result != "ok" || secs >= 5))
                printf "  %-8s %7s  %s\n", result, (result ~ /^no/ ? "" : sprintf("%.1f s", secs)), name
            name = ""
        }
        /^ *(Running|Doc-tests) / {
            if (name != "") { secs = 0; done("no result (cut off)") }
            name = $2; if ($1 == "Running" && $2 == "unittests") name = $3
            if (match($0, /deps\/[A-Za-z0-9_]+-/)) name = name " (" substr($0, RSTART + 5, RLENGTH - 6) ")"
            next
        }
        /^test result: / {
            secs = $NF; sub(/s$/, "", secs); secs += 0
            done($3 == "ok." ? "ok" : "FAILED")
        }
        END { if (name != "") { secs = 0; done("no result (cut off)") } }
    ' "$1"
}

echo "== tests ($(date +%T))"
# --show-output: the numbers passing tests print (boot breakdown, memory, ratios to runc).
# A failure's panic messages are printed again at the end, where CI's tail shows them.
# With HUSK_TEST_DEADLINE (.ci/run sets it), every testbed run ends by then (run.sh), and
# cargo test itself 2 minutes later.
test_log=$(mktemp)
trap 'rm -f "$test_log"' EXIT
limit=()
if [[ -n ${HUSK_TEST_DEADLINE:-} ]]; then
    echo "the tests' deadline: $(date -d "@$HUSK_TEST_DEADLINE" +%T) (HUSK_TEST_DEADLINE), now $(date +%T)"
    limit=(timeout -k 30 $((HUSK_TEST_DEADLINE + 120 - $(date +%s))))
fi
test_start=$(date +%s)
if ! "${limit[@]}" cargo test --workspace --locked --no-fail-fast -- \
    --test-threads="${HUSK_TEST_THREADS:-2}" --show-output 2>&1 | tee "$test_log"; then
    echo "== what failed (the whole output is above; CI keeps only the end of it)"
    failure_summary "$test_log"
    echo "== the test binaries that took 5 s or more, failed or were cut off ($(($(date +%s) - test_start)) s in all)"
    test_times "$test_log"
    exit 1
fi
echo "== the test binaries that took 5 s or more ($(($(date +%s) - test_start)) s in all)"
test_times "$test_log"

echo "== the README's main job (scripts/demo.sh) ($(date +%T))"
demo_out=$(bash scripts/demo.sh 2>&1) || { echo "$demo_out"; echo "demo.sh failed" >&2; exit 1; }
echo "$demo_out" | tail -n 12
grep -q "hello from a husk microVM" <<<"$demo_out" || { echo "demo.sh did not run its container" >&2; exit 1; }
