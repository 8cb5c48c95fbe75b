#!/usr/bin/env bash
# Builds one of the Go test harnesses kept in scripts/harness/ and prints the path of
# the binary (nothing else goes to stdout; build output goes to stderr).
#
# usage: scripts/harness/build.sh suite|suite2|diffclient|reference
#
#   suite       containerd 1.6's snapshotter conformance suite against a proxy daemon (a go test binary)
#   suite2      the same suite from containerd 2.1.9 (core/snapshots/testsuite)
#   diffclient  containerd 1.6's client-side pull/unpack driving a Diff service
#   reference   containerd 1.6's overlayfs snapshotter + walking differ served as a proxy
#
# All build in GOPATH mode (GO111MODULE=off) from Debian packages only: no network
# beyond the Debian archive, no go.mod, no module proxy.
#   - suite, diffclient, reference: Debian 12's Go (golang-go, 1.19) and containerd 1.6
#     sources (golang-github-containerd-containerd-dev, /usr/share/gocode), installed
#     with apt-get when missing.
#   - suite2: trixie's golang-1.24 and forky's containerd 2.1.9 sources with the forky
#     versions of the Go packages its testsuite imports (V2_PACKAGES below), fetched
#     with `apt-get download` and unpacked with `dpkg-deb -x` into the cache (v2/root),
#     never installed. The trixie/forky apt sources, pinned low so that nothing on the
#     system upgrades from them, are scripts/lib/containerd-versions.sh's.
# Everything needs root the first time (apt).
#
# Binaries are cached in ${DEDUP_CACHE:-/var/cache/dedup-snapshotter-tests}/harness/bin and
# rebuilt when a source file (or this script) is newer than the binary; Go's build cache
# lives beside them (harness/go-build) unless GOCACHE is set. Concurrent callers take
# turns on a lock.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
name=${1:-}
case "$name" in
suite | suite2 | diffclient | reference) ;;
*)
    sed -n '2,28p' "$0" >&2
    exit 2
    ;;
esac

cache=${DEDUP_CACHE:-/var/cache/dedup-snapshotter-tests}/harness
bin=$cache/bin/$name

# containerd 2.x: what its snapshotter testsuite and proxy need, as Debian packages.
# containerd's own are pinned (the version under test); Go comes from trixie (2.1.9
# wants go >= 1.24.2); the rest is whatever forky has (the versions used are logged
# and kept in v2/root/.packages).
V2_CONTAINERD=2.1.9+ds1-5
V2_GO=1.24
V2_PACKAGES=(
    "golang-$V2_GO-go/trixie" "golang-$V2_GO-src/trixie"
    "golang-github-containerd-containerd-dev=$V2_CONTAINERD"
    "golang-github-containerd-containerd-api-dev=$V2_CONTAINERD"
    golang-github-containerd-continuity-dev/forky golang-github-containerd-errdefs-dev/forky
    golang-github-containerd-log-dev/forky golang-github-containerd-ttrpc-dev/forky
    golang-github-containerd-typeurl-dev/forky golang-github-coreos-bbolt-dev/forky
    golang-github-davecgh-go-spew-dev/forky golang-github-gogo-protobuf-dev/forky
    golang-github-golang-protobuf-1-5-dev/forky golang-github-google-go-cmp-dev/forky
    golang-github-moby-sys-dev/forky golang-github-opencontainers-go-digest-dev/forky
    golang-github-opencontainers-image-spec-dev/forky golang-github-opencontainers-specs-dev/forky
    golang-github-pmezard-go-difflib-dev/forky golang-github-sirupsen-logrus-dev/forky
    golang-github-stretchr-testify-dev/forky golang-golang-x-net-dev/forky
    golang-golang-x-sync-dev/forky golang-golang-x-sys-dev/forky golang-golang-x-text-dev/forky
    golang-google-genproto-dev/forky golang-google-grpc-dev/forky golang-google-protobuf-dev/forky
    golang-gopkg-yaml.v3-dev/forky
)
v2root=$cache/v2/root

note() { echo "harness/build.sh: $*" >&2; }
die() {
    note "$*"
    exit 1
}

# The Go files that make up each tool: suite2 shares the daemon side with suite.
sources() {
    case "$name" in
    suite2) printf '%s\n' "$here"/suite2/*.go "$here/suite/daemon.go" ;;
    *) printf '%s\n' "$here/$name"/*.go ;;
    esac
}

# Stale when missing, or when a source file, this script or (suite2) its toolchain
# changed after it was built.
stale() {
    local f
    [[ -x "$bin" ]] || return 0
    [[ "$here/build.sh" -nt "$bin" ]] && return 0
    if [[ "$name" == suite2 && "$v2root/.packages" -nt "$bin" ]]; then return 0; fi
    while read -r f; do
        [[ "$f" -nt "$bin" ]] && return 0
    done < <(sources)
    return 1
}

# Debian 12's Go and containerd 1.6 sources, on the system.
bookworm_toolchain() {
    if ! command -v go >/dev/null ||
        [[ ! -d /usr/share/gocode/src/github.com/containerd/containerd/snapshots/testsuite ]]; then
        note "installing golang-go and golang-github-containerd-containerd-dev"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq >&2
        apt-get install -y -qq --no-install-recommends -o DPkg::Lock::Timeout=600 \
            golang-go golang-github-containerd-containerd-dev >&2
    fi
    export GOPATH=/usr/share/gocode
    go_desc="$(go version | cut -d' ' -f3), containerd $(dpkg-query -W -f='${Version}' \
        golang-github-containerd-containerd-dev 2>/dev/null || echo '?')"
}

# trixie's Go and forky's containerd 2.1.9 sources + dependencies, unpacked into v2root.
# The unpacked tree is reused while its package list (.packages, first line) is unchanged.
v2_toolchain() {
    local want tmp
    want="packages: ${V2_PACKAGES[*]}"
    if [[ ! -f "$v2root/.packages" || "$(head -n1 "$v2root/.packages")" != "$want" ]]; then
        [[ $(id -u) -eq 0 ]] || die "suite2's first build needs root (apt-get download)"
        # shellcheck source=../lib/containerd-versions.sh
        . "$here/../lib/containerd-versions.sh"
        if _cv_write_apt_sources || ! apt-cache show "golang-github-containerd-containerd-dev=$V2_CONTAINERD" >/dev/null 2>&1; then
            _cv_apt_update || die "apt-get update (trixie, forky) failed"
        fi
        mkdir -p "$cache/v2"
        tmp=$(mktemp -d "$cache/v2/.fetch.XXXXXX")
        # shellcheck disable=SC2064 # expand now: tmp is local
        trap "rm -rf '$tmp'" EXIT
        mkdir "$tmp/debs" "$tmp/root"
        note "downloading ${#V2_PACKAGES[@]} Debian packages for containerd $V2_CONTAINERD's suite (go $V2_GO)"
        if ! (cd "$tmp/debs" && apt-get download -qq -o APT::Sandbox::User=root "${V2_PACKAGES[@]}" >&2); then
            note "apt-get download failed; refreshing the trixie/forky lists and trying once more"
            _cv_apt_update || die "apt-get update (trixie, forky) failed"
            (cd "$tmp/debs" && apt-get download -qq -o APT::Sandbox::User=root "${V2_PACKAGES[@]}" >&2) ||
                die "apt-get download failed (a package or version no longer in trixie/forky? see above)"
        fi
        for deb in "$tmp"/debs/*.deb; do
            dpkg-deb -x "$deb" "$tmp/root"
        done
        {
            echo "$want"
            for deb in "$tmp"/debs/*.deb; do
                # shellcheck disable=SC2016 # dpkg's own ${field} syntax
                dpkg-deb -W --showformat='${Package} ${Version}\n' "$deb"
            done
        } >"$tmp/root/.packages"
        "$tmp/root/usr/lib/go-$V2_GO/bin/go" version >&2 || die "go $V2_GO from trixie does not run here"
        rm -rf "$v2root"
        mv "$tmp/root" "$v2root"
        rm -rf "$tmp"
        trap - EXIT
        note "unpacked into $v2root:"
        tail -n +2 "$v2root/.packages" | sed 's/^/    /' >&2
    fi
    export GOROOT=$v2root/usr/lib/go-$V2_GO GOPATH=$v2root/usr/share/gocode GOTOOLCHAIN=local
    export PATH=$GOROOT/bin:$PATH
    go_desc="$(go version | cut -d' ' -f3), containerd $V2_CONTAINERD from $v2root"
}

if ! stale; then
    echo "$bin"
    exit 0
fi

mkdir -p "$cache/bin" "$cache/src"
exec 9>"$cache/.lock-$name"
flock 9
# Another caller may have built it while we waited.
if ! stale; then
    echo "$bin"
    exit 0
fi

go_desc=
if [[ "$name" == suite2 ]]; then
    v2_toolchain
else
    bookworm_toolchain
fi

# Build from a copy: the repo stays free of build products, and a source edited
# mid-build cannot mix two versions.
stage=$cache/src/$name
rm -rf "$stage"
mkdir -p "$stage"
mapfile -t files < <(sources)
cp -- "${files[@]}" "$stage/"

note "building $name ($go_desc)"
began=$SECONDS
tmpbin=$bin.tmp.$$
trap 'rm -f "$tmpbin"' EXIT
export GO111MODULE=off GOFLAGS='' GOCACHE=${GOCACHE:-$cache/go-build}
(
    cd "$stage"
    case "$name" in
    suite | suite2) go test -c -o "$tmpbin" . ;;
    *) go build -o "$tmpbin" . ;;
    esac
) >&2
mv -f "$tmpbin" "$bin"
note "built $bin in $((SECONDS - began))s"
echo "$bin"
