#!/usr/bin/env bash
# Builds one of the Go test harnesses kept in scripts/harness/ and prints the path of
# the binary (nothing else goes to stdout; build output goes to stderr).
#
# usage: scripts/harness/build.sh suite|diffclient|reference
#
#   suite       containerd's snapshotter conformance suite against a proxy daemon (a go test binary)
#   diffclient  containerd's client-side pull/unpack driving a Diff service
#   reference   containerd's overlayfs snapshotter + walking differ served as a proxy
#
# They compile against Debian 12's containerd 1.6 sources (golang-github-containerd-containerd-dev,
# in /usr/share/gocode) with Debian's Go, in GOPATH mode (GO111MODULE=off): no network, no
# go.mod. Both packages are installed with apt-get when missing (needs root).
# Binaries are cached in ${DEDUP_CACHE:-/var/cache/dedup-snapshotter-tests}/harness/bin and
# rebuilt when a source file (or this script) is newer than the binary; Go's build cache
# lives beside them (harness/go-build) unless GOCACHE is set. Concurrent callers take
# turns on a lock.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
name=${1:-}
case "$name" in
suite | diffclient | reference) ;;
*)
    sed -n '2,17p' "$0" >&2
    exit 2
    ;;
esac

gocode=/usr/share/gocode
containerd_src=$gocode/src/github.com/containerd/containerd
cache=${DEDUP_CACHE:-/var/cache/dedup-snapshotter-tests}/harness
src=$here/$name
bin=$cache/bin/$name

note() { echo "harness/build.sh: $*" >&2; }

# Stale when missing, or when a source file or this script changed after it was built.
stale() {
    [[ -x "$bin" ]] || return 0
    [[ "$here/build.sh" -nt "$bin" ]] && return 0
    [[ -n "$(find "$src" -type f -newer "$bin" -print -quit)" ]]
}

if ! stale; then
    echo "$bin"
    exit 0
fi

if ! command -v go >/dev/null || [[ ! -d "$containerd_src/snapshots/testsuite" ]]; then
    note "installing golang-go and golang-github-containerd-containerd-dev"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq --no-install-recommends -o DPkg::Lock::Timeout=600 \
        golang-go golang-github-containerd-containerd-dev >&2
fi

mkdir -p "$cache/bin" "$cache/src"
exec 9>"$cache/.lock-$name"
flock 9
# Another caller may have built it while we waited.
if ! stale; then
    echo "$bin"
    exit 0
fi

# Build from a copy: the repo stays free of build products, and a source edited
# mid-build cannot mix two versions.
stage=$cache/src/$name
rm -rf "$stage"
mkdir -p "$stage"
cp "$src"/*.go "$stage/"

note "building $name ($(go version | cut -d' ' -f3), containerd $(dpkg-query -W -f='${Version}' golang-github-containerd-containerd-dev 2>/dev/null || echo '?'))"
began=$SECONDS
tmp=$bin.tmp.$$
trap 'rm -f "$tmp"' EXIT
export GOPATH=$gocode GO111MODULE=off GOFLAGS='' GOCACHE=${GOCACHE:-$cache/go-build}
(
    cd "$stage"
    if [[ "$name" == suite ]]; then
        go test -c -o "$tmp" .
    else
        go build -o "$tmp" .
    fi
) >&2
mv -f "$tmp" "$bin"
note "built $bin in $((SECONDS - began))s"
echo "$bin"
