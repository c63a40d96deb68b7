# shellcheck shell=bash
# Writes initramfs archives with the kernel's own usr/gen_init_cpio: device
# nodes without needing root, fixed timestamps (reproducible archives).
# Requires lib/common.sh and lib/kernel.sh.

# husk_gen_init_cpio_version: the kernel source package version the tool is built from
# (part of the initramfs cache key).
husk_gen_init_cpio_version() {
    dpkg-query -W -f '${Version}' "$HUSK_KERNEL_SRC_PKG"
}

# husk_gen_init_cpio LIST OUT: writes the gzip'd newc archive described by
# LIST (gen_init_cpio format) to OUT.
husk_gen_init_cpio() {
    local list=$1 out=$2 tool
    tool="$HUSK_CACHE/tools/gen_init_cpio-$(husk_gen_init_cpio_version)"
    if [[ ! -x $tool ]]; then
        husk_kernel_source
        mkdir -p "$HUSK_CACHE/tools"
        gcc -O2 -o "$tool.tmp.$$" "$HUSK_KERNEL_TREE/usr/gen_init_cpio.c"
        mv -f "$tool.tmp.$$" "$tool"
    fi
    "$tool" -t 0 "$list" | gzip -9 -n >"$out"
}

# husk_initramfs_dirs DIR...: gen_init_cpio lines for empty directories.
husk_initramfs_dirs() {
    local d
    for d in "$@"; do
        case $d in
        /tmp) echo "dir $d 1777 0 0" ;;
        *) echo "dir $d 0755 0 0" ;;
        esac
    done
}
