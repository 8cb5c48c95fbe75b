// Package suite puts a snapshotter that runs in its own process through containerd's
// snapshotter conformance tests, reaching it the way containerd reaches a
// `type = "snapshot"` proxy plugin: gRPC over a unix socket.
//
// This file is the containerd 1.6 build (snapshots/testsuite from Debian 12's
// golang-github-containerd-containerd-dev); ../suite2 is the containerd 2.x build. Both
// share daemon.go. Every test case gets a daemon of its own, started on the case's
// private directory and stopped (SIGTERM, then SIGKILL after 10 s) when the case ends,
// so no case sees another's state. Built and run by scripts/harness/suite.sh.
package suite

import (
	"context"
	"testing"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/snapshots"
	"github.com/containerd/containerd/snapshots/overlay"
	"github.com/containerd/containerd/snapshots/proxy"
	"github.com/containerd/containerd/snapshots/testsuite"
)

func TestSnapshotter(t *testing.T) {
	// containerd 1.6's suite skips Rename for every snapshotter; the name only labels temp dirs.
	testsuite.SnapshotterSuite(t, "Proxy", openSnapshotter)
}

// openSnapshotter is the suite's factory: one snapshotter per test case, on dir.
func openSnapshotter(ctx context.Context, dir string) (snapshots.Snapshotter, func() error, error) {
	if *daemonFlag == "" {
		sn, err := overlay.NewSnapshotter(dir)
		if err != nil {
			return nil, nil, err
		}
		return sn, sn.Close, nil
	}
	d, err := startDaemon(dir)
	if err != nil {
		return nil, nil, err
	}
	conn, err := d.connect(ctx)
	if err != nil {
		_ = d.stop()
		return nil, nil, err
	}
	return proxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(conn), "proxy"), closeBoth(conn, d), nil
}
