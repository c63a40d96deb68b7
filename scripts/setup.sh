#!/usr/bin/env bash
# Installs what husk needs to build and test on a fresh Debian 12 machine (as root):
# Debian packages for the guest kernel build, the nested-KVM testbed and the tests.
# Idempotent: a second run installs nothing new.
set -euo pipefail

PACKAGES=(
    # guest and testbed kernels
    linux-source-6.12 bc bison flex libelf-dev libssl-dev cpio xz-utils kmod build-essential
    # the testbed (nested KVM under TCG) and guest images
    qemu-system-x86 busybox-static e2fsprogs erofs-utils
    # containerd integration and the runc peer in benchmarks
    containerd runc containernetworking-plugins iproute2
    # test tools
    procps psmisc util-linux shellcheck file python3
)

missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    echo "setup: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
echo "setup: system packages present"

# crictl, for the containerd tests: built from its module on the Go module proxy (cached by
# version under $HUSK_CACHE/tools). `go install ...@version` cannot do it: the checksum
# database has no entry for the served versions, so the module is fetched with GONOSUMDB and
# built inside its own tree (its go.mod's replace directives apply there).
CRICTL_VERSION=v1.34.0
cache=${HUSK_CACHE:-/var/cache/husk}
crictl=$cache/tools/crictl-$CRICTL_VERSION/crictl
if [[ ! -x $crictl ]]; then
    echo "setup: building crictl $CRICTL_VERSION"
    export GONOSUMDB=sigs.k8s.io GOFLAGS=-mod=mod
    dir=$(go mod download -json "sigs.k8s.io/cri-tools@$CRICTL_VERSION" |
        sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')
    [[ -n $dir ]] || { echo "setup: could not download cri-tools $CRICTL_VERSION" >&2; exit 1; }
    src=$(mktemp -d)
    cp -r "$dir/." "$src"
    chmod -R u+w "$src"
    mkdir -p "$(dirname "$crictl")"
    (cd "$src" && go build -trimpath -o "$crictl.tmp" ./cmd/crictl)
    mv "$crictl.tmp" "$crictl"
    rm -rf "$src"
fi
ln -sf "$crictl" /usr/local/bin/crictl
echo "setup: crictl $CRICTL_VERSION at /usr/local/bin/crictl"
