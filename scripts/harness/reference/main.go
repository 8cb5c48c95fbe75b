// Command reference is a known-good peer for the dedup snapshotter: containerd 1.6's own
// overlayfs snapshotter (and, given -containerd, its walking differ) served over gRPC on
// one unix socket, the way any proxy plugin is served. Point the same clients and tests
// at it to see what containerd's built-in behaviour is.
//
//	reference --root DIR --address SOCKET [--containerd CTRD.sock]
//
// The Diff service reads and writes containerd's content store; each call carries the
// incoming request's namespace and lease, otherwise a layer written by Compare could be
// garbage-collected before the client gets to use it. containerd is dialled on first
// use, so it may start after this daemon. SIGTERM or SIGINT stops serving and exits 0.
// Built and run by scripts/harness/reference.sh (scripts/e2e-env.sh's `reference`).
package main

import (
	"context"
	"flag"
	"fmt"
	"net"
	"os"
	"os/signal"
	"sync"
	"syscall"
	"time"

	contentapi "github.com/containerd/containerd/api/services/content/v1"
	diffapi "github.com/containerd/containerd/api/services/diff/v1"
	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/api/types"
	"github.com/containerd/containerd/content"
	contentproxy "github.com/containerd/containerd/content/proxy"
	"github.com/containerd/containerd/contrib/snapshotservice"
	"github.com/containerd/containerd/diff"
	"github.com/containerd/containerd/diff/apply"
	"github.com/containerd/containerd/diff/walking"
	"github.com/containerd/containerd/errdefs"
	"github.com/containerd/containerd/leases"
	"github.com/containerd/containerd/mount"
	"github.com/containerd/containerd/namespaces"
	"github.com/containerd/containerd/pkg/dialer"
	"github.com/containerd/containerd/snapshots/overlay"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"google.golang.org/grpc"
)

func main() {
	root := flag.String("root", "", "the snapshotter's state directory")
	address := flag.String("address", "", "unix socket to serve on")
	ctrd := flag.String("containerd", "", "containerd's socket; enables the Diff service (its content store)")
	flag.Parse()
	if *root == "" || *address == "" {
		fmt.Fprintln(os.Stderr, "usage: reference --root DIR --address SOCKET [--containerd CTRD.sock]")
		os.Exit(2)
	}
	if err := serve(*root, *address, *ctrd); err != nil {
		fmt.Fprintln(os.Stderr, "reference:", err)
		os.Exit(1)
	}
}

func serve(root, address, ctrd string) error {
	sn, err := overlay.NewSnapshotter(root)
	if err != nil {
		return err
	}
	defer sn.Close()
	srv := grpc.NewServer()
	snapshotsapi.RegisterSnapshotsServer(srv, snapshotservice.FromSnapshotter(sn))
	if ctrd != "" {
		diffapi.RegisterDiffServer(srv, &differ{containerd: ctrd})
	}
	l, err := net.Listen("unix", address)
	if err != nil {
		return err
	}
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	go func() {
		<-sigs
		srv.Stop() // Serve then returns nil
	}()
	return srv.Serve(l)
}

// differ serves containerd.services.diff.v1.Diff with containerd's walking differ.
type differ struct {
	containerd string
	once       sync.Once
	store      content.Store
	dialErr    error
}

// contentStore dials containerd once, on the first request that needs it.
func (d *differ) contentStore() (content.Store, error) {
	d.once.Do(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		conn, err := grpc.DialContext(ctx, dialer.DialAddress(d.containerd),
			grpc.WithInsecure(), grpc.WithBlock(), grpc.WithAuthority("localhost"),
			grpc.WithContextDialer(dialer.ContextDialer))
		if err != nil {
			d.dialErr = fmt.Errorf("connect to containerd at %s: %w", d.containerd, err)
			return
		}
		d.store = contentproxy.NewContentStore(contentapi.NewContentClient(conn))
	})
	if d.dialErr != nil {
		return nil, errdefs.ToGRPC(fmt.Errorf("%v: %w", d.dialErr, errdefs.ErrUnavailable))
	}
	return d.store, nil
}

// outgoing turns a request's context into one for our own calls to containerd: the
// same namespace and lease, but not the request's deadline or metadata otherwise.
func outgoing(ctx context.Context) context.Context {
	out := context.Background()
	if ns, ok := namespaces.Namespace(ctx); ok {
		out = namespaces.WithNamespace(out, ns)
	}
	if lease, ok := leases.FromContext(ctx); ok {
		out = leases.WithLease(out, lease)
	}
	return out
}

func mountsFromProto(in []*types.Mount) []mount.Mount {
	ms := make([]mount.Mount, 0, len(in))
	for _, m := range in {
		ms = append(ms, mount.Mount{Type: m.Type, Source: m.Source, Options: m.Options})
	}
	return ms
}

func descriptorToProto(d ocispec.Descriptor) *types.Descriptor {
	return &types.Descriptor{MediaType: d.MediaType, Digest: d.Digest, Size_: d.Size, Annotations: d.Annotations}
}

func (d *differ) Apply(ctx context.Context, req *diffapi.ApplyRequest) (*diffapi.ApplyResponse, error) {
	if req.Diff == nil {
		return nil, errdefs.ToGRPC(fmt.Errorf("apply without a diff descriptor: %w", errdefs.ErrInvalidArgument))
	}
	store, err := d.contentStore()
	if err != nil {
		return nil, err
	}
	layer := ocispec.Descriptor{MediaType: req.Diff.MediaType, Digest: req.Diff.Digest, Size: req.Diff.Size_}
	applied, err := apply.NewFileSystemApplier(store).Apply(outgoing(ctx), layer, mountsFromProto(req.Mounts))
	if err != nil {
		return nil, errdefs.ToGRPC(err)
	}
	return &diffapi.ApplyResponse{Applied: descriptorToProto(applied)}, nil
}

func (d *differ) Diff(ctx context.Context, req *diffapi.DiffRequest) (*diffapi.DiffResponse, error) {
	store, err := d.contentStore()
	if err != nil {
		return nil, err
	}
	var opts []diff.Opt
	if req.MediaType != "" {
		opts = append(opts, diff.WithMediaType(req.MediaType))
	}
	if req.Ref != "" {
		opts = append(opts, diff.WithReference(req.Ref))
	}
	if len(req.Labels) > 0 {
		opts = append(opts, diff.WithLabels(req.Labels))
	}
	layer, err := walking.NewWalkingDiff(store).Compare(outgoing(ctx), mountsFromProto(req.Left), mountsFromProto(req.Right), opts...)
	if err != nil {
		return nil, errdefs.ToGRPC(err)
	}
	return &diffapi.DiffResponse{Diff: descriptorToProto(layer)}, nil
}
