#!/usr/bin/env bash
# The lost-VM loop (issue: reliability, step 1), run INSIDE the nested-KVM testbed:
#   tests/testbed/run.sh --timeout 3600 -- tests/scripts/lost-vm-loop.sh REPO ROOTFS [ROUNDS]
# Each round is one `husk run` alone, then a wave of 4 at once, each container writing a few
# lines (stdout and stderr) and exiting 3. A run fails when husk's status is not 3 or a line
# is missing; its husk output (which, on a failure, carries the VMM's exit status and the
# last lines of the VMM log and of the guest console) and L1's kernel log are printed. A run
# still going after HUSK_LOOP_RUN_LIMIT seconds (default 240) is hung: the VMM's status and
# logs and the guest console are printed before it is stopped.
# Prints "N runs, F failed" at the end and exits 1 if any failed.
set -uo pipefail
repo=$1 rootfs=$2 rounds=${3:-10}
husk=$repo/target/debug/husk
out=$(mktemp -d /run/lost-vm-loop.XXXXXX)

runs=0 failed=0
# one ROUND IDX: a husk run whose output goes to $out/ROUND-IDX.{log,status}; each run has
# its own runtime directory, so a hung one can be looked into (VMM status, logs) before it
# is stopped after $limit seconds.
limit=${HUSK_LOOP_RUN_LIMIT:-240}
one() {
    local f=$out/$1-$2 pid dir
    mkdir -p "$f.run"
    XDG_RUNTIME_DIR=$f.run "$husk" run --console-log "$f.console" "$rootfs" -- \
        sh -c 'echo line-one; echo line-two >&2; seq 1 200 | tail -n 1; exit 3' >"$f.log" 2>&1 &
    pid=$!
    local deadline=$((SECONDS + limit))
    while ((SECONDS < deadline)) && kill -0 "$pid" 2>/dev/null; do
        sleep 0.2
    done
    if kill -0 "$pid" 2>/dev/null; then
        {
            echo "HUNG: still running after $limit s"
            for dir in "$f.run"/run-*/vm; do
                echo "--- VMM status"
                "$husk" vmm --api "$dir/jail/api.sock" status 2>&1
                echo "--- vmm.log"
                tail -n 30 "$dir/vmm.log"
            done
            echo "--- guest console"
            tail -n 40 "$f.console"
            echo "--- L1 processes"
            ps -o pid,stat,wchan:20,etime,args -p "$(pgrep -d, -f 'husk')"
        } >>"$f.log" 2>&1
        kill -TERM "$pid"
        sleep 20
        kill -KILL "$pid" 2>/dev/null
    fi
    wait "$pid"
    echo $? >"$f.status"
}
check() { # check ROUND IDX
    local f=$out/$1-$2 rc
    rc=$(cat "$f.status")
    runs=$((runs + 1))
    if [[ $rc == 3 ]] && grep -q line-one "$f.log" && grep -q line-two "$f.log" && grep -qx 200 "$f.log"; then
        rm -rf "$f".*
        return 0
    fi
    failed=$((failed + 1))
    echo "--- FAILED: round $1 run $2 (status $rc) at $(date +%T)"
    cat "$f.log"
    echo "--- guest console (last 20 lines)"
    tail -n 20 "$f.console"
    echo "--- L1 kernel log (last 15 lines)"
    dmesg | tail -n 15
    rm -rf "$f".*
}

start=$(date +%s)
for ((r = 1; r <= rounds; r++)); do
    one "$r" 0
    check "$r" 0
    for i in 1 2 3 4; do one "$r" "$i" & done
    wait
    for i in 1 2 3 4; do check "$r" "$i"; done
    echo "round $r: $runs runs, $failed failed ($(($(date +%s) - start)) s)"
done
leftover=$(find "$out" -mindepth 1 | wc -l)
rm -rf "$out"
echo "left behind: $leftover files; husk-vmm processes: $(pgrep -c husk-vmm || true)"
echo "lost-vm-loop: $((runs - failed)) passed, $failed failed"
((failed == 0))
