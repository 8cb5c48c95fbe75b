#!/usr/bin/env bash
# containerd versions for the end-to-end tests: 1.6 (the system's, Debian bookworm), 1.7 (Debian trixie) and 2.1
# (Debian forky). The newer ones are Debian's own binaries (`containerd`, `ctr`, `containerd-shim-runc-v2`; they need
# only libc and run on bookworm with bookworm's runc), unpacked once into a cache and never installed:
#
#   ${DEDUP_CACHE:-/var/cache/dedup-snapshotter-tests}/containerd/<debian version>/usr/bin
#
# usage: containerd-versions.sh install 1.6|1.7|2.1    prints the bin dir (installs into the cache when missing)
#        containerd-versions.sh bindir  1.6|1.7|2.1    prints the bin dir if installed, fails otherwise (no network)
#        containerd-versions.sh list                   prints the known versions: `1.6 1.7 2.1`
# or source it and call `containerd_version_install VER` / `containerd_version_bindir VER` (both print the dir and
# return non-zero on failure; nothing calls `exit`).
#
# A cold install (as root) adds trixie and forky as apt sources pinned LOW, so nothing on the system ever upgrades
# from them (/etc/apt/sources.list.d/dedup-snapshotter-tests.sources, /etc/apt/preferences.d/dedup-snapshotter-tests:
# trixie priority 50, forky 40), refreshes only those lists (`apt-get update` restricted to that file), then
# `apt-get download containerd=<version>` and `dpkg-deb -x` into the cache. A warm run touches no network.
# Concurrent installs are serialised with a lock file in the cache.

# shellcheck disable=SC2317 # return/exit both handled below for sourced and run use

CONTAINERD_VERSIONS="1.6 1.7 2.1"

# Debian package version and suite of each containerd line.
_cv_deb_version() {
    case "$1" in
    1.7) echo "1.7.24~ds1-6+deb13u1" ;;
    2.1) echo "2.1.9+ds1-5" ;;
    *) return 1 ;;
    esac
}
_cv_suite() {
    case "$1" in
    1.7) echo trixie ;;
    2.1) echo forky ;;
    *) return 1 ;;
    esac
}

_cv_log() { echo "containerd-versions: $*" >&2; }

_cv_cache() { echo "${DEDUP_CACHE:-/var/cache/dedup-snapshotter-tests}/containerd"; }

_CV_SOURCES=/etc/apt/sources.list.d/dedup-snapshotter-tests.sources
_CV_PREFS=/etc/apt/preferences.d/dedup-snapshotter-tests

# containerd_version_bindir VER: the bin dir of an installed version (no network); fails when not installed.
containerd_version_bindir() {
    local ver=${1:-} deb dir
    case "$ver" in
    1.6)
        if [[ -x /usr/bin/containerd && -x /usr/bin/ctr && -x /usr/bin/containerd-shim-runc-v2 ]]; then
            echo /usr/bin
            return 0
        fi
        _cv_log "containerd 1.6 is the system's: apt-get install -y containerd"
        return 1
        ;;
    esac
    deb=$(_cv_deb_version "$ver") || { _cv_log "unknown containerd version '$ver' (known: $CONTAINERD_VERSIONS)"; return 2; }
    dir=$(_cv_cache)/$deb
    if [[ -f "$dir/.complete" && -x "$dir/usr/bin/containerd" && -x "$dir/usr/bin/ctr" &&
        -x "$dir/usr/bin/containerd-shim-runc-v2" ]]; then
        echo "$dir/usr/bin"
        return 0
    fi
    return 1
}

# Writes the pinned trixie/forky sources and preferences (idempotent). Returns 0 if they changed.
_cv_write_apt_sources() {
    local want_src want_pref changed=1
    want_src="# Added by dedup-snapshotter's scripts/lib/containerd-versions.sh: newer containerd binaries for the
# end-to-end tests are downloaded from here (apt-get download), never installed. Pinned low in
# $_CV_PREFS so nothing upgrades from these suites.
Types: deb deb-src
URIs: http://deb.debian.org/debian
Suites: trixie forky
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
"
    want_pref="# Added by dedup-snapshotter's scripts/lib/containerd-versions.sh: never upgrade from trixie/forky.
Package: *
Pin: release n=trixie
Pin-Priority: 50

Package: *
Pin: release n=forky
Pin-Priority: 40
"
    if [[ "$(cat "$_CV_PREFS" 2>/dev/null)"$'\n' != "$want_pref" ]]; then
        printf '%s' "$want_pref" >"$_CV_PREFS.tmp" && mv -f "$_CV_PREFS.tmp" "$_CV_PREFS" || return 2
        changed=0
    fi
    # preferences first: the sources are never visible without their pins
    if [[ "$(cat "$_CV_SOURCES" 2>/dev/null)"$'\n' != "$want_src" ]]; then
        printf '%s' "$want_src" >"$_CV_SOURCES.tmp" && mv -f "$_CV_SOURCES.tmp" "$_CV_SOURCES" || return 2
        changed=0
    fi
    return $changed
}

# Refreshes only our sources' lists (other lists are left as they are).
_cv_apt_update() {
    _cv_log "apt-get update (trixie, forky; pinned low)"
    apt-get update -qq -o DPkg::Lock::Timeout=600 \
        -o Dir::Etc::sourcelist="$_CV_SOURCES" -o Dir::Etc::sourceparts=- \
        -o APT::Get::List-Cleanup=0 >&2
}

_cv_available() { # PKGVERSION: apt knows containerd=PKGVERSION
    apt-cache madison containerd 2>/dev/null | awk -F'|' '{gsub(/ /, "", $2); print $2}' | grep -qxF -- "$1"
}

# containerd_version_install VER: installs VER into the cache when missing; prints its bin dir.
containerd_version_install() {
    local ver=${1:-} deb suite cache dir tmp deb_file rc
    if containerd_version_bindir "$ver" 2>/dev/null; then return 0; fi
    [[ "$ver" == 1.6 ]] && { containerd_version_bindir 1.6; return; }
    deb=$(_cv_deb_version "$ver") || { _cv_log "unknown containerd version '$ver' (known: $CONTAINERD_VERSIONS)"; return 2; }
    suite=$(_cv_suite "$ver")
    [[ $(id -u) -eq 0 ]] || { _cv_log "installing containerd $ver needs root"; return 1; }
    cache=$(_cv_cache)
    mkdir -p "$cache" || return 1
    dir=$cache/$deb
    (
        # serialise concurrent installs (another test run may be doing the same)
        flock -w 900 9 || { _cv_log "timed out waiting for $cache/.lock"; exit 1; }
        if containerd_version_bindir "$ver" >/dev/null 2>&1; then exit 0; fi
        if _cv_write_apt_sources || ! _cv_available "$deb"; then
            _cv_apt_update || { _cv_log "apt-get update failed"; exit 1; }
        fi
        if ! _cv_available "$deb"; then
            _cv_log "containerd=$deb is not in $suite any more; apt-cache madison containerd:"
            apt-cache madison containerd >&2 || true
            exit 1
        fi
        tmp=$(mktemp -d "$cache/.install.XXXXXX") && chmod 755 "$tmp" || exit 1
        trap 'rm -rf "$tmp"' EXIT
        _cv_log "downloading containerd=$deb ($suite)"
        (cd "$tmp" && apt-get download -qq -o APT::Sandbox::User=root "containerd=$deb" >&2) || { _cv_log "apt-get download failed"; exit 1; }
        deb_file=$(ls "$tmp"/containerd_*.deb 2>/dev/null | head -n1)
        [[ -n "$deb_file" ]] || { _cv_log "no .deb downloaded"; exit 1; }
        mkdir "$tmp/root" && dpkg-deb -x "$deb_file" "$tmp/root" || { _cv_log "dpkg-deb -x failed"; exit 1; }
        for b in containerd ctr containerd-shim-runc-v2; do
            [[ -x "$tmp/root/usr/bin/$b" ]] || { _cv_log "$deb_file has no usr/bin/$b"; exit 1; }
        done
        "$tmp/root/usr/bin/containerd" --version >&2 || { _cv_log "containerd $deb does not run here"; exit 1; }
        touch "$tmp/root/.complete"
        rm -rf "$dir"
        mv "$tmp/root" "$dir"
    ) 9>"$cache/.lock"
    rc=$?
    ((rc == 0)) || return $rc
    containerd_version_bindir "$ver"
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
    set -uo pipefail
    case "${1:-}" in
    install) containerd_version_install "${2:-}" ;;
    bindir) containerd_version_bindir "${2:-}" ;;
    list) echo "$CONTAINERD_VERSIONS" ;;
    *) sed -n '2,12p' "$0" >&2; exit 2 ;;
    esac
    exit $?
fi
