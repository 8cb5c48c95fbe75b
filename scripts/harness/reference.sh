#!/usr/bin/env bash
# A known-good proxy peer: containerd 1.6's overlayfs snapshotter (and, with --containerd,
# its walking differ as a Diff service) served over gRPC on one unix socket.
#
# usage: scripts/harness/reference.sh --root DIR --address SOCKET [--containerd CTRD.sock]
#
# Builds the tool first when needed (scripts/harness/build.sh).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
bin=$("$here/build.sh" reference)
exec "$bin" "$@"
