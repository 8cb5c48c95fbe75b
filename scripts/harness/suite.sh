#!/usr/bin/env bash
# containerd's snapshotter conformance suite (containerd 1.6's snapshots/testsuite, from
# Debian's sources) against a snapshotter daemon reached as a proxy plugin, one fresh
# daemon per test case.
#
# usage: scripts/harness/suite.sh 'DAEMON COMMAND with {root} and {socket}' [go test flags]
#   e.g. scripts/harness/suite.sh 'target/release/dedup-snapshotter serve --root {root} --address {socket}'
#        scripts/harness/suite.sh "$CMD" -test.run 'TestSnapshotter/Basic'
#   An empty command ('') runs the suite on containerd's overlayfs snapshotter in process:
#   the baseline (20 cases pass, Rename is skipped).
#
# Needs root (the suite mounts). Prints go test's verbose output (one "--- PASS/FAIL/SKIP"
# line per case); the exit status is the suite's. Builds the suite first when needed
# (scripts/harness/build.sh).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
(($# >= 1)) || {
    sed -n '2,14p' "$0" >&2
    exit 2
}
daemon=$1
shift
bin=$("$here/build.sh" suite)
# Run from the cache dir: nothing the suite leaves behind lands in the caller's directory.
cd "$(dirname "$bin")"
exec "$bin" -test.root -test.v -daemon "$daemon" "$@"
