#!/usr/bin/env bash
# Installs what husk needs to build and test on a fresh Debian 12 machine (as root):
# Debian packages for the guest kernel build, the nested-KVM testbed and the tests.
# Idempotent: a second run installs nothing new.
set -euo pipefail

PACKAGES=(
    # guest and testbed kernels
    linux-source-6.12 bc bison flex libelf-dev libssl-dev cpio xz-utils kmod build-essential
    # the testbed (nested KVM under TCG) and guest images
    qemu-system-x86 busybox-static e2fsprogs
    # containerd integration and the runc peer in benchmarks
    containerd runc containernetworking-plugins iproute2 iptables
    # test tools
    procps psmisc util-linux shellcheck file python3
    # building virtiofsd (the pods' virtio-fs backend)
    libseccomp-dev libcap-ng-dev pkg-config
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

# crictl and critest (cri-tools' validation suite, the test binary of ./cmd/critest) for the
# containerd tests, and ginkgo (critest runs its parallel nodes through it): built from the
# cri-tools module on the Go module proxy, at the ginkgo version cri-tools' go.mod pins, cached
# by version under $HUSK_CACHE/tools. `go install ...@version` cannot do it: the checksum
# database has no entry for the served versions, so the module is fetched with GONOSUMDB and
# built inside its own tree (its go.mod's replace directives apply there).
CRICTL_VERSION=v1.34.0
cache=${HUSK_CACHE:-/var/cache/husk}
tools=$cache/tools/cri-tools-$CRICTL_VERSION
crictl=$cache/tools/crictl-$CRICTL_VERSION/crictl
if [[ ! -x $crictl || ! -x $tools/critest || ! -x $tools/ginkgo ]]; then
    echo "setup: building crictl, critest and ginkgo from cri-tools $CRICTL_VERSION"
    export GONOSUMDB=sigs.k8s.io GOFLAGS=-mod=mod
    dir=$(go mod download -json "sigs.k8s.io/cri-tools@$CRICTL_VERSION" |
        sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')
    [[ -n $dir ]] || { echo "setup: could not download cri-tools $CRICTL_VERSION" >&2; exit 1; }
    src=$(mktemp -d)
    cp -r "$dir/." "$src"
    chmod -R u+w "$src"
    mkdir -p "$(dirname "$crictl")" "$tools"
    (cd "$src" && go build -trimpath -o "$crictl.tmp" ./cmd/crictl &&
        go test -c -trimpath -o "$tools/critest.tmp" ./cmd/critest &&
        go build -trimpath -o "$tools/ginkgo.tmp" github.com/onsi/ginkgo/v2/ginkgo)
    mv "$crictl.tmp" "$crictl"
    mv "$tools/critest.tmp" "$tools/critest"
    mv "$tools/ginkgo.tmp" "$tools/ginkgo"
    rm -rf "$src"
fi
ln -sf "$crictl" /usr/local/bin/crictl
ln -sf "$tools/critest" /usr/local/bin/critest
ln -sf "$tools/ginkgo" /usr/local/bin/ginkgo
echo "setup: crictl, critest and ginkgo of cri-tools $CRICTL_VERSION in /usr/local/bin"

# Debian packages critest's stand-in images are made of (tests/scripts/critest-images.sh),
# unpacked under $HUSK_CACHE/tools/PACKAGE, not installed: nginx (installing it starts a service
# on the host's port 80) and the dynamically linked busybox (its sh runs /bin/ls as a program,
# as upstream busybox's does, where busybox-static's runs its own applet).
unpack_deb() { # PACKAGE FILE: the package unpacked, FILE the one that shows it is there
    local root=$cache/tools/$1 tmp
    if [[ ! -x $root/$2 ]]; then
        echo "setup: unpacking Debian's $1"
        tmp=$(mktemp -d)
        # (apt's _apt user cannot write to a root-only temporary directory: it says so and
        # downloads as root.)
        (cd "$tmp" && { apt-get download -qq "$1" 2>/dev/null ||
            { apt-get update -qq && apt-get download -qq "$1" 2>/dev/null; }; }) &&
            dpkg-deb -x "$tmp/$1"_*.deb "$tmp/root"
        [[ -x $tmp/root/$2 ]] || { echo "setup: could not download $1" >&2; exit 1; }
        rm -rf "$root" && mv "$tmp/root" "$root"
        rm -rf "$tmp"
    fi
    echo "setup: $1 (unpacked) at $root"
}
unpack_deb nginx usr/sbin/nginx
unpack_deb busybox bin/busybox

# virtiofsd, the vhost-user-fs backend each pod's shared directory is served by (Debian 12 has
# only QEMU's old C one): built from crates.io at a pinned version, cached by version under
# $HUSK_CACHE/tools, linked as /usr/local/libexec/husk/virtiofsd.
VIRTIOFSD_VERSION=1.14.0
virtiofsd=$cache/tools/virtiofsd-$VIRTIOFSD_VERSION/bin/virtiofsd
if [[ ! -x $virtiofsd ]]; then
    echo "setup: building virtiofsd $VIRTIOFSD_VERSION"
    cargo install --quiet --locked virtiofsd --version "$VIRTIOFSD_VERSION" \
        --root "$cache/tools/virtiofsd-$VIRTIOFSD_VERSION"
fi
mkdir -p /usr/local/libexec/husk
ln -sf "$virtiofsd" /usr/local/libexec/husk/virtiofsd
echo "setup: virtiofsd $VIRTIOFSD_VERSION at /usr/local/libexec/husk/virtiofsd"
