package suite

// The daemon side of the harness, shared by the containerd 1.6 (suite/) and 2.x
// (suite2/) builds: it uses nothing from containerd, only the standard library and
// gRPC calls that both Debian gRPC versions (1.33 and 1.8x) have.

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"google.golang.org/grpc"
)

var (
	daemonFlag = flag.String("daemon", "",
		"the snapshotter daemon's command line; {root} becomes its state directory and {socket} the "+
			"socket it must serve on. Empty: containerd's overlayfs snapshotter in this process (a baseline run)")
	serveWithin = flag.Duration("serve-within", 20*time.Second,
		"how long a freshly started daemon may take to accept gRPC connections")
)

const (
	// How long a daemon may take to exit after SIGTERM before it is killed.
	stopGrace = 10 * time.Second
	// containerd's limits for proxy plugin messages (defaults.DefaultMax{Recv,Send}MsgSize).
	maxMsgSize = 16 << 20
)

// daemon is one running snapshotter process.
type daemon struct {
	cmd    *exec.Cmd
	socket string
	exited chan struct{} // closed once the process has been reaped
	status error         // cmd.Wait's result, valid after exited is closed
}

// startDaemon starts the -daemon command for one test case, on dir: its state goes in
// dir/state, its socket is dir/snapshotter.sock.
func startDaemon(dir string) (*daemon, error) {
	return launch(*daemonFlag, filepath.Join(dir, "state"), filepath.Join(dir, "snapshotter.sock"))
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

// dialUnix connects to a unix socket, retrying while it does not exist yet or nobody
// listens on it (a daemon still starting), until ctx ends. The target may carry the
// unix:// prefix that containerd puts on proxy plugin addresses.
func dialUnix(ctx context.Context, target string) (net.Conn, error) {
	path := strings.TrimPrefix(target, "unix://")
	for {
		var d net.Dialer
		conn, err := d.DialContext(ctx, "unix", path)
		if err == nil || !(errors.Is(err, syscall.ENOENT) || errors.Is(err, syscall.ECONNREFUSED)) {
			return conn, err
		}
		select {
		case <-ctx.Done():
			return nil, err
		case <-time.After(10 * time.Millisecond):
		}
	}
}

// connect dials the daemon's socket as containerd dials a proxy plugin (a unix://
// target, `:authority` localhost, containerd's message size limits) and waits until
// the connection is up, the daemon dies, or serveWithin runs out.
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
	conn, err := grpc.DialContext(ctx, "unix://"+d.socket,
		grpc.WithInsecure(),
		grpc.WithBlock(),
		grpc.WithAuthority("localhost"),
		grpc.WithContextDialer(dialUnix),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(maxMsgSize), grpc.MaxCallSendMsgSize(maxMsgSize)),
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

// closeBoth closes the client connection, then stops the daemon.
func closeBoth(conn *grpc.ClientConn, d *daemon) func() error {
	return func() error {
		cerr := conn.Close()
		if err := d.stop(); err != nil {
			return err
		}
		return cerr
	}
}
