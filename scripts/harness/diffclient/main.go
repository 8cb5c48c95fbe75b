// Command diffclient exercises a Diff service (containerd.services.diff.v1.Diff) with
// containerd's own client library (Debian 12's containerd 1.6): the same unpacker that
// `ctr` and nerdctl run, except that every Apply and Compare goes to the Diff service
// named by -diff. Content, images, leases and snapshots still come from the containerd
// at -address (snapshots through its proxy plugin -snapshotter). This is how a
// containerd >= 1.7.4 with a `type = "diff"` proxy plugin uses a differ.
//
// Commands (one per run; results are printed as one JSON object on stdout):
//
//	pull REF
//	    pull REF from a plain-http registry and unpack every layer through the Diff service;
//	    prints {"image": NAME, "seconds": WALL-TIME, "target": MANIFEST-DIGEST}.
//	    With -cri-labels, Prepare carries the labels CRI's image service adds
//	    (containerd.io/snapshot/cri.image-ref, cri.layer-digest, cri.manifest-digest,
//	    cri.image-layers), which a remote (lazy) snapshotter needs to prepare layers itself.
//	diff KEY [MEDIATYPE]
//	    Compare snapshot KEY (active or committed) with its parent; the layer lands in
//	    containerd's content store; prints its descriptor. MEDIATYPE defaults to tar+gzip.
//	apply DIGEST MEDIATYPE PARENT NEWKEY
//	    prepare NEWKEY-active on PARENT ("" for none), Apply the blob DIGEST from the content
//	    store to it, commit it as NEWKEY; prints the descriptor Apply returned.
//
// pull drops its lease when done (the image record then keeps its content alive); diff
// and apply leave theirs to expire after 24 hours, so a later run can use what they made.
//
// Errors go to stderr as "diffclient: ..." with exit status 1.
// Built and run by scripts/harness/diffclient.sh.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"time"

	"github.com/containerd/containerd"
	diffapi "github.com/containerd/containerd/api/services/diff/v1"
	"github.com/containerd/containerd/defaults"
	"github.com/containerd/containerd/diff"
	"github.com/containerd/containerd/mount"
	"github.com/containerd/containerd/namespaces"
	"github.com/containerd/containerd/pkg/dialer"
	"github.com/containerd/containerd/pkg/snapshotters"
	"github.com/containerd/containerd/remotes/docker"
	"github.com/containerd/containerd/snapshots"
	digest "github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"google.golang.org/grpc"
)

const usage = "usage: diffclient [flags] pull REF | diff KEY [MEDIATYPE] | apply DIGEST MEDIATYPE PARENT NEWKEY"

// session is what every command works with: a containerd client whose Diff service may
// be ours, a context carrying the namespace and a lease, and the snapshotter's name.
type session struct {
	ctx         context.Context
	client      *containerd.Client
	snapshotter string
	criLabels   bool
	out         *json.Encoder
}

func main() {
	var (
		address   = flag.String("address", "/run/containerd/containerd.sock", "containerd's socket")
		diffSock  = flag.String("diff", "", "the Diff service's socket (empty: containerd's own differ)")
		sn        = flag.String("snapshotter", "dedup", "snapshotter name as containerd knows it")
		namespace = flag.String("namespace", "default", "containerd namespace")
		criLabels = flag.Bool("cri-labels", false, "pull: add CRI's layer labels to each Prepare (for remote/lazy snapshotters)")
	)
	flag.Usage = func() {
		fmt.Fprintln(flag.CommandLine.Output(), usage)
		flag.PrintDefaults()
	}
	flag.Parse()
	if err := dispatch(*address, *diffSock, *sn, *namespace, *criLabels, flag.Args()); err != nil {
		fmt.Fprintln(os.Stderr, "diffclient:", err)
		os.Exit(1)
	}
}

func dispatch(address, diffSock, sn, namespace string, criLabels bool, args []string) error {
	if len(args) == 0 {
		return errors.New(usage)
	}
	// Check the arguments before connecting anywhere.
	var run func(*session, []string) error
	switch cmd, n := args[0], len(args)-1; {
	case cmd == "pull" && n == 1:
		run = (*session).pull
	case cmd == "diff" && (n == 1 || n == 2):
		run = (*session).diff
	case cmd == "apply" && n == 4:
		run = (*session).apply
	case cmd == "pull" || cmd == "diff" || cmd == "apply":
		return fmt.Errorf("wrong number of arguments for %s; %s", cmd, usage)
	default:
		return fmt.Errorf("unknown command %q; %s", cmd, usage)
	}

	var opts []containerd.ClientOpt
	if diffSock != "" {
		conn, err := dialDiffer(diffSock)
		if err != nil {
			return err
		}
		defer conn.Close()
		differ := containerd.NewDiffServiceFromClient(diffapi.NewDiffClient(conn))
		opts = append(opts, containerd.WithServices(containerd.WithDiffService(differ)))
	}
	client, err := containerd.New(address, opts...)
	if err != nil {
		return err
	}
	defer client.Close()

	ctx := namespaces.WithNamespace(context.Background(), namespace)
	// Without a lease, what a command writes could be garbage-collected before use.
	ctx, release, err := client.WithLease(ctx) // expires after 24 h
	if err != nil {
		return err
	}
	if args[0] == "pull" {
		defer release(ctx)
	}
	s := &session{ctx: ctx, client: client, snapshotter: sn, criLabels: criLabels, out: json.NewEncoder(os.Stdout)}
	return run(s, args[1:])
}

// dialDiffer connects to the Diff service the way containerd connects to a proxy
// plugin: its unix dialer, a unix:// target and `:authority` localhost.
func dialDiffer(sock string) (*grpc.ClientConn, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	conn, err := grpc.DialContext(ctx, dialer.DialAddress(sock),
		grpc.WithInsecure(),
		grpc.WithBlock(),
		grpc.WithAuthority("localhost"),
		grpc.WithContextDialer(dialer.ContextDialer),
		grpc.WithDefaultCallOptions(
			grpc.MaxCallRecvMsgSize(defaults.DefaultMaxRecvMsgSize),
			grpc.MaxCallSendMsgSize(defaults.DefaultMaxSendMsgSize)),
	)
	if err != nil {
		return nil, fmt.Errorf("connect to diff service %s: %w", sock, err)
	}
	return conn, nil
}

// pullResult is pull's output; fields in the order encoding/json gives a map's keys.
type pullResult struct {
	Image   string        `json:"image"`
	Seconds float64       `json:"seconds"`
	Target  digest.Digest `json:"target"`
}

func (s *session) pull(args []string) error {
	ref := args[0]
	opts := []containerd.RemoteOpt{
		containerd.WithPullUnpack,
		containerd.WithPullSnapshotter(s.snapshotter),
		containerd.WithResolver(docker.NewResolver(docker.ResolverOptions{PlainHTTP: true})),
	}
	if s.criLabels {
		opts = append(opts, containerd.WithImageHandlerWrapper(snapshotters.AppendInfoHandlerWrapper(ref)))
	}
	began := time.Now()
	img, err := s.client.Pull(s.ctx, ref, opts...)
	if err != nil {
		return err
	}
	return s.out.Encode(pullResult{Image: img.Name(), Seconds: time.Since(began).Seconds(), Target: img.Target().Digest})
}

func (s *session) diff(args []string) error {
	key, mediaType := args[0], ocispec.MediaTypeImageLayerGzip
	if len(args) > 1 {
		mediaType = args[1]
	}
	sn := s.client.SnapshotService(s.snapshotter)
	info, err := sn.Stat(s.ctx, key)
	if err != nil {
		return err
	}
	// The upper side: an active snapshot's own mounts; a committed one needs a view.
	var upper []mount.Mount
	if info.Kind == snapshots.KindActive {
		if upper, err = sn.Mounts(s.ctx, key); err != nil {
			return err
		}
	} else {
		view := scratchKey("upper")
		if upper, err = sn.View(s.ctx, view, key); err != nil {
			return err
		}
		defer sn.Remove(s.ctx, view)
	}
	// The lower side: a view of the parent, or nothing for a base layer.
	lower := []mount.Mount{}
	if info.Parent != "" {
		view := scratchKey("lower")
		if lower, err = sn.View(s.ctx, view, info.Parent); err != nil {
			return err
		}
		defer sn.Remove(s.ctx, view)
	}
	desc, err := s.client.DiffService().Compare(s.ctx, lower, upper, diff.WithMediaType(mediaType))
	if err != nil {
		return err
	}
	return s.out.Encode(desc)
}

func (s *session) apply(args []string) error {
	blob, err := digest.Parse(args[0])
	if err != nil {
		return err
	}
	mediaType, parent, key := args[1], args[2], args[3]
	info, err := s.client.ContentStore().Info(s.ctx, blob)
	if err != nil {
		return err
	}
	sn := s.client.SnapshotService(s.snapshotter)
	active := key + "-active"
	mounts, err := sn.Prepare(s.ctx, active, parent)
	if err != nil {
		return err
	}
	applied, err := s.client.DiffService().Apply(s.ctx,
		ocispec.Descriptor{MediaType: mediaType, Digest: blob, Size: info.Size}, mounts)
	if err != nil {
		_ = sn.Remove(s.ctx, active)
		return err
	}
	if err := sn.Commit(s.ctx, key, active); err != nil {
		return err
	}
	return s.out.Encode(applied)
}

// scratchKey names a temporary view nobody else uses.
func scratchKey(side string) string {
	return fmt.Sprintf("diffclient-%s-%d", side, time.Now().UnixNano())
}
