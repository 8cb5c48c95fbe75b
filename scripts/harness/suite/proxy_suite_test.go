// Package suite puts a snapshotter that runs in its own process through containerd's
// snapshotter conformance tests (snapshots/testsuite from Debian 12's containerd 1.6
// sources), reaching it the way containerd reaches a `type = "snapshot"` proxy plugin:
// gRPC over a unix socket.
//
// Every test case gets a daemon of its own, started on the case's private directory
// and stopped (SIGTERM, then SIGKILL after 10 s) when the case ends, so no case sees
// another's state. Built and run by scripts/harness/suite.sh.
package suite

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/defaults"
	"github.com/containerd/containerd/pkg/dialer"
	"github.com/containerd/containerd/snapshots"
	"github.com/containerd/containerd/snapshots/overlay"
	"github.com/containerd/containerd/snapshots/proxy"
	"github.com/containerd/containerd/snapshots/testsuite"
	"google.golang.org/grpc"
)

var (
	daemonFlag = flag.String("daemon", "",
		"the snapshotter daemon's command line; {root} becomes its state directory and {socket} the "+
			"socket it must serve on. Empty: containerd's overlayfs snapshotter in this process (a baseline run)")
	serveWithin = flag.Duration("serve-within", 20*time.Second,
		"how long a freshly started daemon may take to accept gRPC connections")
)

// How long a daemon may take to exit after SIGTERM before it is killed.
const stopGrace = 10 * time.Second

func TestSnapshotter(t *testing.T) {
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
	d, err := launch(*daemonFlag, filepath.Join(dir, "state"), filepath.Join(dir, "snapshotter.sock"))
	if err != nil {
		return nil, nil, err
	}
	conn, err := d.connect(ctx)
	if err != nil {
		_ = d.stop()
		return nil, nil, err
	}
	sn := proxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(conn), "proxy")
	closeAll := func() error {
		cerr := conn.Close()
		if err := d.stop(); err != nil {
			return err
		}
		return cerr
	}
	return sn, closeAll, nil
}

// daemon is one running snapshotter process.
type daemon struct {
	cmd    *exec.Cmd
	socket string
	exited chan struct{} // closed once the process has been reaped
	status error         // cmd.Wait's result, valid after exited is closed
}

// launch substitutes the placeholders word by word (so a path with a space stays one
// argument) and starts the command; its output goes to our stderr, next to go test's.
func launch(cmdline, state, socket string) (*daemon, error) {
	if err := os.MkdirAll(state, 0o700); err != nil {
		return nil, err
	}
	words := strings.Fields(cmdline)
	if len(words) == 0 {
		return nil, errors.New("empty -daemon command")
	}
	fill := strings.NewReplacer("{root}", state, "{socket}", socket)
	for i := range words {
		words[i] = fill.Replace(words[i])
	}
	cmd := exec.Command(words[0], words[1:]...)
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("starting %q: %w", words[0], err)
	}
	d := &daemon{cmd: cmd, socket: socket, exited: make(chan struct{})}
	go func() {
		d.status = cmd.Wait()
		close(d.exited)
	}()
	return d, nil
}

// connect dials the daemon's socket as containerd dials a proxy plugin (its own
// dialer, a unix:// target, message size limits, `:authority` localhost) and waits
// until the connection is up, the daemon dies, or serveWithin runs out.
func (d *daemon) connect(ctx context.Context) (*grpc.ClientConn, error) {
	ctx, cancel := context.WithTimeout(ctx, *serveWithin)
	defer cancel()
	go func() {
		select {
		case <-d.exited:
			cancel()
		case <-ctx.Done():
		}
	}()
	conn, err := grpc.DialContext(ctx, dialer.DialAddress(d.socket),
		grpc.WithInsecure(),
		grpc.WithBlock(),
		grpc.WithAuthority("localhost"),
		grpc.WithContextDialer(dialer.ContextDialer),
		grpc.WithDefaultCallOptions(
			grpc.MaxCallRecvMsgSize(defaults.DefaultMaxRecvMsgSize),
			grpc.MaxCallSendMsgSize(defaults.DefaultMaxSendMsgSize)),
	)
	if err == nil {
		return conn, nil
	}
	select {
	case <-d.exited:
		return nil, fmt.Errorf("daemon exited before serving on %s: %v", d.socket, d.status)
	default:
		return nil, fmt.Errorf("daemon did not serve on %s within %s: %w", d.socket, *serveWithin, err)
	}
}

// stop asks the daemon to exit and reaps it. A daemon that died before it was asked,
// or ignores SIGTERM (it is then killed), is reported: both fail the case.
func (d *daemon) stop() error {
	select {
	case <-d.exited:
		return fmt.Errorf("daemon exited during the test case: %v", d.status)
	default:
	}
	_ = d.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-d.exited:
		return nil
	case <-time.After(stopGrace):
		_ = d.cmd.Process.Kill()
		<-d.exited
		return fmt.Errorf("daemon still running %s after SIGTERM; killed", stopGrace)
	}
}
