# shellcheck shell=bash
# Builds a Linux kernel (vmlinux) from Debian's linux-source-6.12 and a list
# of Kconfig fragments, cached by content. Used by guest-image/build.sh (the
# guest kernel) and tests/testbed/run.sh (the L1 testbed kernel).
# Requires lib/common.sh. The content of THIS file is part of the cache key.

HUSK_KERNEL_SRC_PKG=linux-source-6.12
HUSK_KERNEL_TARBALL=/usr/src/linux-source-6.12.tar.xz
HUSK_KERNEL_LIB="${BASH_SOURCE[0]}"

husk_kernel_packages() {
    husk_ensure_packages "$HUSK_KERNEL_SRC_PKG" build-essential bc bison flex \
        libelf-dev libssl-dev cpio xz-utils file
}

# husk_kernel_source: unpacks the kernel source once per Debian package
# version into $HUSK_CACHE/src and sets HUSK_KERNEL_TREE.
husk_kernel_source() {
    local version tree tmp
    version=$(dpkg-query -W -f '${Version}' "$HUSK_KERNEL_SRC_PKG")
    tree="$HUSK_CACHE/src/$HUSK_KERNEL_SRC_PKG-$version"
    if [[ ! -f $tree/Makefile ]]; then
        husk_log "unpacking $HUSK_KERNEL_TARBALL ($version)"
        mkdir -p "$HUSK_CACHE/src"
        tmp=$(mktemp -d "$HUSK_CACHE/src/.unpack.XXXXXX")
        tar -C "$tmp" -xf "$HUSK_KERNEL_TARBALL"
        rm -rf "$tree"
        mv "$tmp/$HUSK_KERNEL_SRC_PKG" "$tree"
        rm -rf "$tmp"
    fi
    HUSK_KERNEL_TREE=$tree
    HUSK_KERNEL_VERSION=$version
}

# husk_kernel_key FRAGMENT...: the cache key of a kernel built from these
# fragments: sha256 of (source package version, gcc and ld versions, fragments, this file).
husk_kernel_key() {
    local version
    # The packages first: without them the key would name no version, and the next run
    # (with them) would not find this build.
    husk_kernel_packages
    version=$(dpkg-query -W -f '${Version}' "$HUSK_KERNEL_SRC_PKG")
    [[ -n $version ]] || husk_die "no version of $HUSK_KERNEL_SRC_PKG installed"
    {
        printf '%s %s\n' "$HUSK_KERNEL_SRC_PKG" "$version"
        # The toolchain that compiles and links it.
        gcc --version | head -n 1
        ld --version | head -n 1
        husk_hash_files "$@" "$HUSK_KERNEL_LIB"
    } | sha256sum | cut -d' ' -f1
}

# husk_kernel_check_config CONFIG FRAGMENT...: every `CONFIG_X=v` of the
# fragments must be in CONFIG, every `# CONFIG_X is not set` must be unset.
husk_kernel_check_config() {
    local config=$1 line name bad=0
    shift
    while IFS= read -r line; do
        if [[ $line =~ ^(CONFIG_[A-Za-z0-9_]+)=(.*)$ ]]; then
            if ! grep -qxF -- "$line" "$config"; then
                name=${BASH_REMATCH[1]}
                husk_log "kernel config: $line did not survive olddefconfig (got: $(grep -E "^(# )?${name}[= ]" "$config" || echo 'absent'))"
                bad=1
            fi
        elif [[ $line =~ ^#\ (CONFIG_[A-Za-z0-9_]+)\ is\ not\ set$ ]]; then
            name=${BASH_REMATCH[1]}
            if grep -q "^$name=" "$config"; then
                husk_log "kernel config: $name should be unset but is $(grep "^$name=" "$config")"
                bad=1
            fi
        fi
    done < <(cat "$@")
    return "$bad"
}

# husk_kernel_build NAME FRAGMENT...: builds (or reuses) the kernel and sets
# HUSK_KERNEL_VMLINUX to $HUSK_CACHE/kernel/<key>/vmlinux.
# NAME only names the scratch build dir ($HUSK_CACHE/build/kernel-NAME),
# which is kept for incremental rebuilds. Kernel builds are serialized by a
# lock: two at once would only make both slow.
# shellcheck disable=SC2034 # HUSK_KERNEL_VMLINUX is the result
husk_kernel_build() {
    local name=$1 key dir out start tmp frag
    shift
    local frags=()
    for frag in "$@"; do
        [[ -f $frag ]] || husk_die "no kernel config fragment $frag"
        frags+=("$(realpath "$frag")")
    done
    key=$(husk_kernel_key "${frags[@]}")
    dir="$HUSK_CACHE/kernel/$key"
    out="$dir/vmlinux"
    if [[ -f $out ]]; then
        husk_log "kernel $name: cached $out"
        HUSK_KERNEL_VMLINUX=$out
        return 0
    fi
    mkdir -p "$HUSK_CACHE/kernel"
    exec {lockfd}>"$HUSK_CACHE/kernel/.lock"
    husk_log "kernel $name: waiting for the kernel build lock"
    flock "$lockfd"
    if [[ -f $out ]]; then # built by someone else while we waited
        exec {lockfd}>&-
        HUSK_KERNEL_VMLINUX=$out
        return 0
    fi
    start=$(husk_now)
    husk_kernel_packages
    husk_kernel_source
    local build="$HUSK_CACHE/build/kernel-$name"
    local jobs=${HUSK_JOBS:-$(nproc)}
    mkdir -p "$build"
    husk_log "kernel $name: building $key in $build (-j$jobs)"
    # Reproducible: the build stamp (uname -v) comes from the source package, not the clock
    # or this machine.
    export KBUILD_BUILD_TIMESTAMP KBUILD_BUILD_USER=husk KBUILD_BUILD_HOST=husk KBUILD_BUILD_VERSION=1
    KBUILD_BUILD_TIMESTAMP=$(date -u -R -d "@$(stat -c %Y "$HUSK_KERNEL_TARBALL")")
    local mk=(make -C "$HUSK_KERNEL_TREE" O="$build" ARCH=x86_64 -s)
    "${mk[@]}" tinyconfig >&2
    (cd "$HUSK_KERNEL_TREE" &&
        ARCH=x86_64 scripts/kconfig/merge_config.sh -m -O "$build" "$build/.config" "${frags[@]}") >"$build/merge.log" 2>&1 ||
        { cat "$build/merge.log" >&2; husk_die "merge_config.sh failed"; }
    "${mk[@]}" olddefconfig >&2
    husk_kernel_check_config "$build/.config" "${frags[@]}" ||
        husk_die "kernel $name: options of ${frags[*]} were dropped by olddefconfig (missing dependencies?)"
    "${mk[@]}" -j"$jobs" vmlinux >&2 || husk_die "kernel $name: make vmlinux failed"

    tmp=$(mktemp -d "$HUSK_CACHE/kernel/.tmp.$key.XXXXXX")
    cp "$build/vmlinux" "$tmp/vmlinux"
    cp "$build/.config" "$tmp/config"
    printf 'name=%s\nsource=%s %s\nfragments=%s\nbuilt=%s\nseconds=%s\n' \
        "$name" "$HUSK_KERNEL_SRC_PKG" "$HUSK_KERNEL_VERSION" "${frags[*]}" \
        "$(date -u +%FT%TZ)" "$(husk_elapsed "$start")" >"$tmp/build-info"
    rm -rf "$dir"
    mv "$tmp" "$dir"
    exec {lockfd}>&-
    husk_log "kernel $name: built in $(husk_elapsed "$start") s: $out, $(husk_size "$out")"
    HUSK_KERNEL_VMLINUX=$out
}
