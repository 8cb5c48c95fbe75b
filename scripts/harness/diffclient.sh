#!/usr/bin/env bash
# containerd 1.6's own client code (pull/unpack, Compare, Apply) driving a Diff service.
#
# usage: scripts/harness/diffclient.sh [-address CTRD.sock] [-diff DIFF.sock] [-snapshotter NAME]
#            [-namespace NS] [-cri-labels] (pull REF | diff KEY [MEDIATYPE] | apply DIGEST MEDIATYPE PARENT NEWKEY)
#
# Prints one JSON object per command; see scripts/harness/diffclient/main.go. Builds the
# tool first when needed (scripts/harness/build.sh).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
bin=$("$here/build.sh" diffclient)
exec "$bin" "$@"
