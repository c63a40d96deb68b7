# shellcheck shell=bash
# Helpers shared by guest-image/build.sh and tests/testbed/run.sh.
# Sourced, never executed. Logs go to stderr so stdout stays for results.

HUSK_CACHE="${HUSK_CACHE:-/var/cache/husk}"

husk_log() {
    printf '%s: %s\n' "${HUSK_LOG_TAG:-husk}" "$*" >&2
}

husk_die() {
    husk_log "error: $*"
    exit 1
}

# husk_ensure_packages PKG...: apt-get installs the Debian packages that are
# missing. Does not touch the network when everything is there already.
husk_ensure_packages() {
    local missing=() p
    for p in "$@"; do
        if ! dpkg-query -W -f '${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
            missing+=("$p")
        fi
    done
    ((${#missing[@]} == 0)) && return 0
    husk_log "installing ${missing[*]}"
    [[ $(id -u) == 0 ]] || husk_die "need root to apt-get install ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
}

# husk_hash_files FILE...: one hash over the names and contents of the files.
husk_hash_files() {
    local f
    for f in "$@"; do
        printf 'file %s\n' "$(basename "$f")"
        sha256sum <"$f"
    done | sha256sum | cut -d' ' -f1
}

# husk_size FILE: its size in bytes and MiB, for logs.
husk_size() {
    local bytes
    bytes=$(stat -c %s "$1")
    printf '%d bytes (%s MiB)' "$bytes" "$(echo "scale=2; $bytes/1048576" | bc)"
}

# husk_now: seconds since the epoch, with millisecond precision.
husk_now() {
    date +%s.%N | cut -c1-14
}

husk_elapsed() {
    echo "scale=1; ($(husk_now) - $1)/1" | bc
}
