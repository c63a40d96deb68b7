#!/usr/bin/env bash
# What confining the VMM costs: `husk run` of one short container, confined (the default:
# jail, per-thread seccomp filters, cgroup) and unconfined (`[vmm] confine = false`), in
# alternation, ROUNDS times each. Prints each run's time to agent ready (husk's and the
# VMM's own boot timer), the VMM's memory overhead (PSS minus guest memory) and how long
# entering the jail took, then the medians side by side and their ratio. Numbers only: nothing passes or fails on them.
# Inside the testbed (or where /dev/kvm has vmx/svm), as root:
#   bash tests/bench/jail.sh REPO ROOTFS [ROUNDS] [PROFILE]
set -euo pipefail
repo=$1 rootfs=$2 rounds=${3:-5} profile=${4:-release}
husk=$repo/target/$profile/husk
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
printf '[vmm]\nconfine = false\n' >"$tmp/unconfined.toml"
: >"$tmp/confined.toml"

median() { sort -n | awk '{ v[NR] = $1 } END { if (NR == 0) print "-"; else if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

for ((i = 1; i <= rounds; i++)); do
    for mode in confined unconfined; do
        out=$(HUSK_CONFIG=$tmp/$mode.toml "$husk" run --timings "$rootfs" -- true 2>&1) || {
            echo "$mode run $i failed:"
            echo "$out"
            exit 1
        }
        agent=$(grep -o 'agent ready [0-9]* ms' <<<"$out" | grep -o '[0-9]*')
        guest=$(grep -o 'guest ready after [0-9]* ms' <<<"$out" | grep -o '[0-9]*')
        pss=$(grep -o 'overhead [0-9.]* MiB' <<<"$out" | grep -o '[0-9.]*')
        jail=$(grep -o 'jail entered in [0-9.]* ms' <<<"$out" | grep -o '[0-9.]*' || echo -)
        echo "$agent" >>"$tmp/$mode.agent"
        echo "$guest" >>"$tmp/$mode.guest"
        echo "$pss" >>"$tmp/$mode.pss"
        printf 'run %d %-10s agent ready %5s ms, guest ready %5s ms, VMM overhead %s MiB, jail entered in %s ms\n' \
            "$i" "$mode" "$agent" "$guest" "$pss" "$jail"
    done
done
echo "medians of $rounds runs each:"
for what in agent guest pss; do
    c=$(median <"$tmp/confined.$what") u=$(median <"$tmp/unconfined.$what")
    unit=ms
    [[ $what == pss ]] && unit=MiB
    printf '  %-6s confined %s %s, unconfined %s %s, ratio %s\n' "$what" "$c" "$unit" "$u" "$unit" \
        "$(awk -v c="$c" -v u="$u" 'BEGIN { if (u > 0) printf "%.2f", c / u; else print "-" }')"
done
