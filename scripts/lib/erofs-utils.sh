#!/usr/bin/env bash
# erofs-utils 1.9.4 (mkfs.erofs with --tar, what containerd 2.x's erofs differ runs), built once from Debian forky's
# source package into a cache and never installed system-wide (Debian's binary packages of it need a newer glibc):
#
#   ${DEDUP_CACHE:-/var/cache/dedup-snapshotter-tests}/erofs-utils-1.9.4/bin/{mkfs,fsck,dump}.erofs
#
# usage: erofs-utils.sh install    prints the bin dir (builds into the cache when missing; root)
#        erofs-utils.sh bindir     prints the bin dir if built, fails otherwise (no network)
# or source it and call `erofs_utils_install` / `erofs_utils_bindir` (both print the dir and return non-zero on
# failure; nothing calls `exit`).
#
# A cold build (as root): the trixie/forky apt sources pinned LOW that scripts/lib/containerd-versions.sh writes (the
# same files; forky's deb-src is what is needed here), the build dependencies from bookworm (autoconf automake libtool
# pkg-config uuid-dev liblz4-dev libzstd-dev zlib1g-dev libdeflate-dev; a dry run first refuses to go on if apt would
# take any package from trixie or forky),
# `apt-get source --download-only erofs-utils=1.9.4-1` + `dpkg-source -x`, then
#   ./autogen.sh && ./configure --disable-fuse --without-selinux --with-lz4 --with-zstd --with-libdeflate
#       --enable-multithreading && make
# and the three tools copied into the cache. A warm run touches no network. Concurrent builds are serialised with a
# lock file in the cache.

# shellcheck disable=SC2317 # return/exit both handled below for sourced and run use

EROFS_UTILS_VERSION=1.9.4
_EU_DEB_VERSION=1.9.4-1
_EU_BUILD_DEPS="autoconf automake libtool pkg-config uuid-dev liblz4-dev libzstd-dev zlib1g-dev libdeflate-dev"

_eu_log() { echo "erofs-utils: $*" >&2; }

_eu_dir() { echo "${DEDUP_CACHE:-/var/cache/dedup-snapshotter-tests}/erofs-utils-$EROFS_UTILS_VERSION"; }

# erofs_utils_bindir: the bin dir of the built tools (no network); fails when not built.
erofs_utils_bindir() {
    local dir
    dir=$(_eu_dir)
    if [[ -f "$dir/.complete" && -x "$dir/bin/mkfs.erofs" && -x "$dir/bin/fsck.erofs" && -x "$dir/bin/dump.erofs" ]]; then
        echo "$dir/bin"
        return 0
    fi
    return 1
}

_eu_src_available() { # apt knows the source package erofs-utils=$_EU_DEB_VERSION
    apt-cache showsrc erofs-utils 2>/dev/null | awk '/^Version:/ { print $2 }' | grep -qxF -- "$_EU_DEB_VERSION"
}

_eu_build_deps_missing() {
    local p missing=""
    for p in $_EU_BUILD_DEPS; do
        dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q '^install ok installed$' || missing+=" $p"
    done
    echo "$missing"
}

# erofs_utils_install: builds into the cache when missing; prints the bin dir.
erofs_utils_install() {
    if erofs_utils_bindir 2>/dev/null; then return 0; fi
    [[ $(id -u) -eq 0 ]] || { _eu_log "building erofs-utils $EROFS_UTILS_VERSION needs root (apt)"; return 1; }
    local dir cache rc here
    dir=$(_eu_dir)
    cache=$(dirname "$dir")
    here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
    mkdir -p "$cache" || return 1
    (
        flock -w 1800 9 || { _eu_log "timed out waiting for $dir.lock"; exit 1; }
        if erofs_utils_bindir >/dev/null 2>&1; then exit 0; fi
        # the pinned trixie/forky sources (deb + deb-src), shared with containerd-versions.sh
        # shellcheck source=scripts/lib/containerd-versions.sh
        . "$here/containerd-versions.sh" || exit 1
        if _cv_write_apt_sources || ! _eu_src_available; then
            _cv_apt_update || { _eu_log "apt-get update failed"; exit 1; }
        fi
        _eu_src_available || { _eu_log "no source package erofs-utils=$_EU_DEB_VERSION in forky any more"; exit 1; }
        local missing
        missing=$(_eu_build_deps_missing)
        if [[ -n "$missing" ]]; then
            _eu_log "installing build dependencies from bookworm:$missing"
            local plan
            # shellcheck disable=SC2086
            plan=$(apt-get install -s --no-install-recommends $missing 2>&1) || { _eu_log "apt-get install -s: $plan"; exit 1; }
            if grep '^Inst ' <<<"$plan" | grep -Eiq 'trixie|forky|testing|unstable|Debian:13|Debian:14'; then
                _eu_log "apt would install from trixie/forky, refusing:"$'\n'"$(grep '^Inst ' <<<"$plan")"
                exit 1
            fi
            # shellcheck disable=SC2086
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -o DPkg::Lock::Timeout=600 \
                --no-install-recommends $missing >&2 || { _eu_log "apt-get install failed"; exit 1; }
        fi
        command -v dpkg-source >/dev/null || { _eu_log "dpkg-source missing: apt-get install -y dpkg-dev"; exit 1; }
        local tmp src
        tmp=$(mktemp -d "$dir.build.XXXXXX") && chmod 755 "$tmp" || exit 1
        trap 'rm -rf "$tmp"' EXIT
        _eu_log "fetching the source package erofs-utils=$_EU_DEB_VERSION (forky)"
        (cd "$tmp" && apt-get source -qq --download-only -o APT::Sandbox::User=root "erofs-utils=$_EU_DEB_VERSION" >&2) ||
            { _eu_log "apt-get source failed"; exit 1; }
        (cd "$tmp" && dpkg-source -x --no-check ./erofs-utils_"$_EU_DEB_VERSION".dsc src >&2) ||
            { _eu_log "dpkg-source -x failed"; exit 1; }
        src=$tmp/src
        _eu_log "building in $src (a minute or two)"
        (
            cd "$src" &&
                ./autogen.sh &&
                ./configure --disable-fuse --without-selinux --with-lz4 --with-zstd --with-libdeflate \
                    --enable-multithreading &&
                make -j"$(nproc)"
        ) >"$tmp/build.log" 2>&1 || { _eu_log "build failed:"; tail -n 30 "$tmp/build.log" >&2; exit 1; }
        mkdir -p "$tmp/out/bin"
        local t
        for t in mkfs/mkfs.erofs fsck/fsck.erofs dump/dump.erofs; do
            install -m755 "$src/$t" "$tmp/out/bin/" || { _eu_log "$t not built"; exit 1; }
        done
        "$tmp/out/bin/mkfs.erofs" -V 2>&1 | grep -qF "$EROFS_UTILS_VERSION" ||
            { _eu_log "the built mkfs.erofs does not say $EROFS_UTILS_VERSION: $("$tmp/out/bin/mkfs.erofs" -V 2>&1 | head -n 1)"; exit 1; }
        touch "$tmp/out/.complete"
        rm -rf "$dir"
        mv "$tmp/out" "$dir"
    ) 9>"$dir.lock"
    rc=$?
    ((rc == 0)) || return $rc
    erofs_utils_bindir
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
    set -uo pipefail
    case "${1:-install}" in
    install) erofs_utils_install ;;
    bindir) erofs_utils_bindir ;;
    *) sed -n '2,18p' "$0" >&2; exit 2 ;;
    esac
    exit $?
fi
