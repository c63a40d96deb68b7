#!/usr/bin/env bash
# A minimal root filesystem from Debian's busybox-static: busybox and its applet links.
# Made once: a DIR whose bin/busybox is already the real binary is left as it is.
#
#   bash scripts/busybox-rootfs.sh DIR
set -euo pipefail
root=${1:?usage: busybox-rootfs.sh DIR}
[[ -f $root/bin/busybox && ! -L $root/bin/busybox ]] && exit 0
rm -rf "$root"
mkdir -p "$root"/{bin,proc,sys,dev,tmp,etc,root}
cp /bin/busybox "$root/bin/busybox"
for a in $(/bin/busybox --list); do
    [[ $a == busybox ]] || ln -sf busybox "$root/bin/$a"
done
