#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# The images critest's specs pull, built locally as stand-ins (no registry is reachable from
# the testbed) into a registry directory that tests/scripts/registry.py serves:
#
#   critest-images.sh REGISTRY_DIR TOOLS
#
# TOOLS holds Debian's nginx and busybox packages unpacked, as TOOLS/nginx and TOOLS/busybox
# (scripts/setup.sh puts them under $HUSK_CACHE/tools). Every image is a busybox root
# (Debian's dynamically linked busybox with its libraries, procps' pgrep and util-linux's
# ipcs, which it lacks, and upstream busybox's users and groups) plus what the image's spec
# needs. Not busybox-static: its sh runs applets before programs, so `sh -c ls` would never
# run a masked /bin/ls (MaskedPaths); upstream busybox's sh, and this one, run /bin/ls. Which are stand-ins, and how they differ from the originals:
#   registry.k8s.io/e2e-test-images/busybox:1.29-2   busybox 1.35 instead of 1.29
#   registry.k8s.io/e2e-test-images/nginx:1.14-2     Debian's nginx 1.22 on port 80
#   registry.k8s.io/e2e-test-images/httpd:2.4.39-4   busybox httpd on port 80 (not Apache)
#   registry.k8s.io/e2e-test-images/nonewprivs:1.3   a setuid-root program printing its euid
#   gcr.io/k8s-staging-cri-tools/*                   as cri-tools' images/ Dockerfiles build
#                                                    them, on this busybox; the digest-pinned
#                                                    test-image-digest cannot be rebuilt
#   gcr.io/k8s-staging-cri-tools/hostnet-nginx-amd64 nginx on port 12003
set -euo pipefail
reg=${1:?usage: critest-images.sh REGISTRY_DIR TOOLS}
tools=${2:?usage: critest-images.sh REGISTRY_DIR TOOLS}
nginx=$tools/nginx busybox=$tools/busybox/bin/busybox
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=cri-env.sh
. "$here/cri-env.sh"
for f in "$nginx/usr/sbin/nginx" "$busybox"; do
    [[ -x $f ]] || { echo "critest-images: no $f (run scripts/setup.sh)" >&2; exit 1; }
done

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
PATH_ENV='"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"'

# with_libs ROOT FILE [DEST]: FILE (a dynamically linked program) copied into ROOT at DEST
# (default: its own path), with the shared libraries and the loader it needs.
with_libs() {
    local root=$1 f=$2 dest=${3:-$2} lib
    mkdir -p "$root$(dirname "$dest")"
    cp -L "$f" "$root$dest"
    for lib in $(ldd "$f" | grep -o '/[^ ]*'); do
        mkdir -p "$root$(dirname "$lib")"
        cp -L "$lib" "$root$lib"
    done
}

# push REF CONFIG_JSON LAYER_DIR...: the image, tagged REF (HOST/REPO:TAG), in the registry.
push() {
    local ref=$1 config=$2 name tag
    shift 2
    oci_blobs "$reg/blobs" "$config" "$@"
    name=${ref%:*} tag=${ref##*:}
    mkdir -p "$reg/tags/$name"
    echo "sha256:$OCI_MANIFEST" >"$reg/tags/$name/$tag"
}

# The base layer: busybox, pgrep and ipcs, upstream busybox's /etc/passwd and /etc/group.
base=$work/base
mkdir -p "$base"/{bin,proc,sys,dev,tmp,etc,root}
with_libs "$base" "$busybox" /bin/busybox
# Applets as hard links to busybox, as in the busybox image: a masked path (a bind mount over
# /bin/ls) then hides that name only, not busybox itself.
for a in $("$busybox" --list); do
    [[ $a == busybox ]] || ln -f "$base/bin/busybox" "$base/bin/$a"
done
with_libs "$base" /usr/bin/pgrep
with_libs "$base" /usr/bin/ipcs
mkdir -p "$base"/{home,var/run,var/log,usr/local/bin} && chmod 1777 "$base/tmp"
cat >"$base/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/bin/sh
daemon:x:1:1:daemon:/usr/sbin:/bin/false
bin:x:2:2:bin:/bin:/bin/false
sys:x:3:3:sys:/dev:/bin/false
sync:x:4:100:sync:/bin:/bin/sync
mail:x:8:8:mail:/var/spool/mail:/bin/false
www-data:x:33:33:www-data:/var/www:/bin/false
operator:x:37:37:Operator:/var:/bin/false
nobody:x:65534:65534:nobody:/home:/bin/false
EOF
cat >"$base/etc/group" <<'EOF'
root:x:0:
daemon:x:1:
bin:x:2:
sys:x:3:
adm:x:4:
tty:x:5:
disk:x:6:
wheel:x:10:root
mail:x:12:
www-data:x:33:
operator:x:37:
users:x:100:
nogroup:x:65534:
EOF
busybox_config="{\"Env\":[$PATH_ENV],\"Cmd\":[\"sh\"]}"
k8s=registry.k8s.io/e2e-test-images cri=gcr.io/k8s-staging-cri-tools
push "$k8s/busybox:1.29-2" "$busybox_config" "$base"

# nginx: Debian's, its master as PID 1 (the process title "nginx: master process ..."), its
# pid file in /var/run/nginx.pid, the page on PORT.
nginx_layer() { # DIR PORT
    with_libs "$1" "$nginx/usr/sbin/nginx" /usr/sbin/nginx
    mkdir -p "$1/etc/nginx" "$1/var/lib/nginx" "$1/var/log/nginx" "$1/usr/share/nginx/html"
    cat >"$1/etc/nginx/nginx.conf" <<EOF
user www-data;
worker_processes 1;
pid /var/run/nginx.pid;
error_log stderr;
events { worker_connections 256; }
http {
    access_log /dev/stdout;
    server {
        listen $2;
        root /usr/share/nginx/html;
        index index.html;
    }
}
EOF
    echo '<html><head><title>Welcome to nginx!</title></head><body><h1>Welcome to nginx!</h1></body></html>' \
        >"$1/usr/share/nginx/html/index.html"
}
nginx_config="{\"Env\":[$PATH_ENV],\"Cmd\":[\"nginx\",\"-g\",\"daemon off;\"],\"ExposedPorts\":{\"80/tcp\":{}},\"StopSignal\":\"SIGQUIT\"}"
nginx_layer "$work/nginx" 80
push "$k8s/nginx:1.14-2" "$nginx_config" "$base" "$work/nginx"
nginx_layer "$work/hostnet-nginx" 12003
push "$cri/hostnet-nginx-amd64:latest" "$nginx_config" "$base" "$work/hostnet-nginx"

# httpd: the page on port 80 and a first log line naming httpd, from busybox's httpd.
mkdir -p "$work/httpd/usr/local/apache2/htdocs"
echo '<html><body><h1>It works!</h1></body></html>' >"$work/httpd/usr/local/apache2/htdocs/index.html"
push "$k8s/httpd:2.4.39-4" \
    "{\"Env\":[$PATH_ENV],\"Cmd\":[\"sh\",\"-c\",\"echo httpd: busybox httpd serving /usr/local/apache2/htdocs on port 80; exec httpd -f -v -p 80 -h /usr/local/apache2/htdocs\"],\"ExposedPorts\":{\"80/tcp\":{}}}" \
    "$base" "$work/httpd"

# nonewprivs: a setuid-root program that prints its effective uid (root when the setuid bit
# takes effect, the caller's under no_new_privs).
mkdir -p "$work/nnp/usr/local/bin"
printf '#include <stdio.h>\n#include <unistd.h>\nint main(void) { printf("Effective uid: %%d\\n", (int)geteuid()); return 0; }\n' >"$work/nnp.c"
gcc -static -O2 -o "$work/nnp/usr/local/bin/nnp" "$work/nnp.c"
chmod 4755 "$work/nnp/usr/local/bin/nnp"
push "$k8s/nonewprivs:1.3" "{\"Env\":[$PATH_ENV],\"Cmd\":[\"/usr/local/bin/nnp\"]}" "$base" "$work/nnp"

# The image user images (cri-tools images/image-user, images/image-predefined-group).
push "$cri/test-image-user-uid:latest" "{\"Env\":[$PATH_ENV],\"Cmd\":[\"sh\"],\"User\":\"1002\"}" "$base"
push "$cri/test-image-user-username:latest" "{\"Env\":[$PATH_ENV],\"Cmd\":[\"sh\"],\"User\":\"www-data\"}" "$base"
push "$cri/test-image-user-uid-group:latest" "{\"Env\":[$PATH_ENV],\"Cmd\":[\"sh\"],\"User\":\"1003:1004\"}" "$base"
push "$cri/test-image-user-username-group:latest" "{\"Env\":[$PATH_ENV],\"Cmd\":[\"sh\"],\"User\":\"www-data:1004\"}" "$base"
mkdir -p "$work/group/etc" "$work/group/home/default-user"
cp "$base/etc/passwd" "$base/etc/group" "$work/group/etc/"
echo 'default-user:x:1000:1000:Linux User,,,:/home/default-user:/bin/sh' >>"$work/group/etc/passwd"
printf 'default-user:x:1000:\ngroup-defined-in-image:x:50000:default-user\n' >>"$work/group/etc/group"
push "$cri/test-image-predefined-group:latest" "{\"Env\":[$PATH_ENV],\"Cmd\":[\"sh\"],\"User\":\"1000\"}" "$base" "$work/group"

# The image service's images (cri-tools images/image-test): a file named after the test in
# the root, so that different tests are different images.
test_image() { # REF FILE (the same FILE: the same image)
    if [[ ! -d $work/t-$2 ]]; then
        mkdir -p "$work/t-$2"
        echo "$2" >"$work/t-$2/$2"
    fi
    push "$1" "$busybox_config" "$base" "$work/t-$2"
}
test_image "$cri/test-image-latest:latest" test-image-latest
test_image "$cri/test-image-tag:test" test-image-tag
test_image "$cri/test-image-tag:all" test-image-tag-all
for i in 1 2 3; do
    test_image "$cri/test-image-$i:latest" "test-image-$i"
    test_image "$cri/test-image-tags:$i" same-image
done
echo "critest-images: $(find "$reg/tags" -type f | wc -l) tags, $(find "$reg/blobs" -type f | wc -l) blobs, $(du -sh "$reg" | cut -f1)"
