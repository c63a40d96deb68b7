#!/usr/bin/env bash
# Container create+start against image size, husk beside runc, run INSIDE the nested-KVM
# testbed (scripts/bench.sh does that) with containerd's state and husk's layer cache on one
# tmpfs: for each image (a busybox layer and a layer of SIZE MiB of random files, built by
# scripts/bench.sh as OCI archives under IMAGES/SIZE/image.tar):
#   runc:          create+start of a container in a fresh runc pod;
#   husk first:    create+start in a fresh husk pod, the image's first use on the node (its
#                  layers are converted into the cache: the shim's log says how long);
#   husk second:   the same image in another fresh husk pod (the cache has its layers).
# Before the layer cache, every husk create packed the whole image (about what "first" costs
# now); now only the first does. Numbers only, never pass/fail.
# Usage: layers.sh REPO IMAGES SIZE_MIB...
set -uo pipefail
repo=$1 images=$2
shift 2
# shellcheck source-path=SCRIPTDIR source=../scripts/cri-env.sh
. "$repo/tests/scripts/cri-env.sh"
husk=$repo/target/release/husk
[[ -x $husk ]] || husk=$repo/target/debug/husk
CRI_TMPFS_SIZE=6g cri_config || exit 1
mkdir -p /etc/husk
printf '[storage]\ndir = "%s/husk"\n' "$CRI_ROOT" >/etc/husk/config.toml
"$husk" install --config "$CRI_ROOT/config.toml" --bin-dir /usr/local/bin >/dev/null && cri_launch || exit 1
trap 'cri_stop; rm -f /etc/husk/config.toml' EXIT
d=$(mktemp -d)
now() { date +%s%N; }
ms() { echo $((($2 - $1) / 1000000)); }

# create_start LABEL UNTRUSTED IMAGE: runp, then create+start timed: the pod and container
# ids in $pod $cid, the milliseconds in $took.
create_start() {
    local t0
    pod_json "$d/p.json" "$1" "$2"
    IMAGE=$3 container_json "$d/c.json" "c-$1" '["sleep","100000"]'
    pod=$("${CRICTL[@]}" runp "$d/p.json") || return 1
    t0=$(now)
    cid=$("${CRICTL[@]}" create "$pod" "$d/c.json" "$d/p.json") &&
        "${CRICTL[@]}" start "$cid" >/dev/null || return 1
    took=$(ms "$t0" "$(now)")
}

remove() {
    "${CRICTL[@]}" stop -t 1 "$cid" >/dev/null
    "${CRICTL[@]}" rm "$cid" >/dev/null
    "${CRICTL[@]}" stopp "$pod" >/dev/null
    "${CRICTL[@]}" rmp "$pod" >/dev/null
}

echo "image MiB | runc ms | husk first ms (ratio) | husk second ms (ratio) | layer conversion ms | cache MiB after 2 pods"
for size in "$@"; do
    name=docker.io/husk/bench-$size:1
    t0=$(now)
    ctr --address "$CRI_SOCK" -n k8s.io images import "$images/$size/image.tar" >/dev/null || exit 1
    import=$(ms "$t0" "$(now)")
    create_start "r$size" false "$name" || exit 1
    runc=$took
    remove
    create_start "h$size" true "$name" || exit 1
    first=$took
    conv=$(grep -o "container $cid: .*" "$CRI_ROOT/containerd.log" | head -1)
    p1=$pod c1=$cid
    create_start "h2$size" true "$name" || exit 1
    second=$took
    cache=$(du -sm "$CRI_ROOT/husk/layers" | cut -f1)
    remove
    pod=$p1 cid=$c1 remove
    converted=$(grep -o 'layer cache: .* converted into .* in [0-9]* ms' "$CRI_ROOT/containerd.log" | tail -1 | grep -o '[0-9]* ms$')
    printf '%s | %s | %s (%s) | %s (%s) | %s | %s   (import %s ms; %s)\n' "$size" "$runc" \
        "$first" "$(awk -v a="$first" -v b="$runc" 'BEGIN { printf "%.1fx", a / b }')" \
        "$second" "$(awk -v a="$second" -v b="$runc" 'BEGIN { printf "%.1fx", a / b }')" \
        "${converted:-?}" "$cache" "$import" "${conv#container * }"
    "${CRICTL[@]}" rmi "$name" >/dev/null
    "$husk" gc >/dev/null
done
