// The containerd 2.x build of the proxy snapshotter suite: core/snapshots/testsuite from
// Debian forky's golang-github-containerd-containerd-dev (2.1.9), compiled with a newer
// Go and the forky versions of its dependencies, all unpacked into a cache, never
// installed (scripts/harness/build.sh suite2). The daemon side is ../suite/daemon.go,
// copied in at build time. Run by scripts/harness/suite2.sh.
package suite

import (
	"context"
	"flag"
	"testing"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/proxy"
	"github.com/containerd/containerd/v2/core/snapshots/testsuite"
	"github.com/containerd/containerd/v2/plugins/snapshots/overlay"
)

// containerd 2.x runs Rename for real and adapts it to the snapshotter's name: for
// "overlayfs" it leaves out renaming a directory of a lower layer, which overlayfs
// cannot do without redirect_dir. A snapshotter that hands out overlay mounts has the
// same limit, hence the default.
var suiteName = flag.String("name", "overlayfs",
	"the snapshotter name the suite adapts to (overlayfs: no rename of lower-layer directories)")

func TestSnapshotter(t *testing.T) {
	testsuite.SnapshotterSuite(t, *suiteName, openSnapshotter)
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
