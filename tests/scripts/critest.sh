#!/usr/bin/env bash
# Run inside the nested-KVM testbed by tests/tests/critest.rs: cri-tools' validation suite
# (critest) against containerd 1.6 with each runtime handler, runc first, then husk. Images
# come from a local registry (tests/scripts/registry.py) serving locally built stand-ins
# (tests/scripts/critest-images.sh), to which containerd's registry mirrors point
# registry.k8s.io, gcr.io, docker.io and quay.io. Sections as in cri-checks.sh, one per
# handler, with one line per spec (tests/scripts/critest-report.py).
#
#   critest.sh REPO [HANDLER...]     (default: runc husk)
# Environment: CRITEST_NODES (parallel ginkgo nodes, default 2), CRITEST_FOCUS and
# CRITEST_SKIP (ginkgo regular expressions, to study a few specs), CRITEST_DEBUG (non-empty:
# also the end of critest's and containerd's logs).
set -uo pipefail
repo=$1
shift
handlers=("$@")
((${#handlers[@]})) || handlers=(runc husk)
# shellcheck source-path=SCRIPTDIR source=cri-env.sh
. "$repo/tests/scripts/cri-env.sh"
cache=${HUSK_CACHE:-/var/cache/husk}
port=5000

ended() {
    (($2 == 0)) || { echo "--- containerd.log (last lines)"; tail -n 60 "$CRI_ROOT/containerd.log"; }
    echo "=== $1 rc=$2"
}

setup() {
    cri_config || return 1
    "$repo/target/debug/husk" install --config "$CRI_ROOT/config.toml" --bin-dir /usr/local/bin ||
        return 1
    # Port mappings (critest's networking specs) through CNI's portmap plugin, as a kubelet
    # node has them.
    sed -i 's/{"type": "loopback"}/{"type": "portmap", "capabilities": {"portMappings": true}},\n             &/' \
        "$CRI_ROOT/cni-conf/10-husk.conflist"
    cri_registry "$port" "$cache/tools" || return 1
    cri_launch
}

echo "=== setup"
setup
ended setup $?

for h in "${handlers[@]}"; do
    echo "=== critest $h"
    out=$CRI_ROOT/critest-$h
    mkdir -p "$out"
    t0=$(date +%s)
    # A spec that fails is run once more, for both handlers (the nested testbed is slow and
    # noisy): one that then passes counts as passed and is reported as flaky (the report's
    # "flaky" lines), so flakes stay in sight without failing the comparison.
    # The parallel nodes are ginkgo's: critest runs itself under the ginkgo CLI (on PATH).
    # (--parallel 1 would read as go test's -parallel, which ginkgo refuses.)
    par=()
    ((${CRITEST_NODES:-2} > 1)) && par=(--parallel "${CRITEST_NODES:-2}")
    (cd "$out" && critest --runtime-endpoint "unix://$CRI_SOCK" --image-endpoint "unix://$CRI_SOCK" \
        --runtime-handler "$h" "${par[@]}" --ginkgo.flake-attempts 2 \
        --ginkgo.no-color --ginkgo.json-report "$out/report.json" \
        ${CRITEST_FOCUS:+--ginkgo.focus "$CRITEST_FOCUS"} ${CRITEST_SKIP:+--ginkgo.skip "$CRITEST_SKIP"} \
        >"$out/log" 2>&1)
    rc=$?
    echo "critest exit $rc after $(($(date +%s) - t0)) s"
    if [[ -f $out/report.json ]]; then
        python3 "$repo/tests/scripts/critest-report.py" "$out/report.json" "$h"
    else
        tail -n 40 "$out/log"
    fi
    if [[ -n ${CRITEST_DEBUG:-} ]]; then
        echo "--- critest log"; grep -v '^\s*$' "$out/log" | tail -n 300
        echo "--- containerd log"; grep -v 'level=info msg="\(ImageCreate\|ImageUpdate\)' "$CRI_ROOT/containerd.log" | tail -n 400
    fi
    echo "leftovers: pods $("${CRICTL[@]}" pods -q | wc -l) containers $("${CRICTL[@]}" ps -aq | wc -l) vmm $(pgrep -c husk-vmm) shim $(pgrep -c -f containerd-shim-husk)"
    # critest's exit status says whether any spec failed; the test compares the handlers.
    [[ -f $out/report.json ]]
    ended "critest $h" $?
done

cri_stop
