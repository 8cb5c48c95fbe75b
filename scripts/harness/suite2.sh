#!/usr/bin/env bash
# containerd 2.1.9's snapshotter conformance suite (core/snapshots/testsuite, from Debian
# forky's sources) against a snapshotter daemon reached as a proxy plugin, one fresh
# daemon per test case: the newer twin of suite.sh.
#
# usage: scripts/harness/suite2.sh 'DAEMON COMMAND with {root} and {socket}' [go test flags]
#   e.g. scripts/harness/suite2.sh 'target/release/dedup-snapshotter serve --root {root} --address {socket}'
#   An empty command ('') runs the suite on containerd 2.1.9's overlayfs snapshotter in
#   process: the baseline (21 cases pass).
#   -name NAME: the name the suite adapts its Rename case to (default overlayfs: no rename
#   of a lower layer's directory, which overlay mounts cannot do without redirect_dir).
#
# Needs root (the suite mounts). Prints go test's verbose output (one "--- PASS/FAIL/SKIP"
# line per case); the exit status is the suite's. The first run fetches trixie's Go and
# forky's containerd sources into the cache and builds (scripts/harness/build.sh suite2).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
(($# >= 1)) || {
    sed -n '2,15p' "$0" >&2
    exit 2
}
daemon=$1
shift
bin=$("$here/build.sh" suite2)
# Run from the cache dir: nothing the suite leaves behind lands in the caller's directory.
cd "$(dirname "$bin")"
exec "$bin" -test.root -test.v -daemon "$daemon" "$@"
