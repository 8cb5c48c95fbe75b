//! The Snapshots service end to end: a real store behind `serve` on a unix socket,
//! driven by containerd-client's generated client exactly as containerd's proxy
//! plugin drives it. The assertions are containerd's semantics (the codes its errdefs
//! maps back, List's OR-of-ANDs filters, Update's field mask).
//!
//! The store mounts EROFS layers, so these tests need root: they fail (never skip)
//! without it.

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use containerd_client::services::v1::snapshots as pb;
use containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient;
use grpc_services::snapshots::{info_to_proto, mount_to_proto};
use snapshotter::Snapshotter;
use tokio::sync::oneshot;
use tonic::transport::Channel;
use tonic::Code;

fn assert_root() {
    let uid = std::fs::metadata("/proc/self").expect("/proc/self").uid();
    assert_eq!(uid, 0, "these tests mount file systems: run them as root");
}

/// A store served on a temporary socket, and a client connected to it.
///
/// The directory is the last field: dropped last (also when a test panics), it
/// unmounts whatever the store left mounted under it, then goes.
struct Harness {
    socket: PathBuf,
    store: Arc<Snapshotter>,
    client: SnapshotsClient<Channel>,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), String>>,
    dir: test_support::TestDir,
}

impl Harness {
    async fn start() -> Harness {
        Harness::start_with_mode(grpc_services::DEFAULT_SOCKET_MODE).await
    }

    async fn start_with_mode(mode: u32) -> Harness {
        assert_root();
        let dir = test_support::TestDir::new("grpc-snapshots-");
        let store = Arc::new(Snapshotter::open(&dir.path().join("root")).expect("open the store"));
        let socket = dir.path().join("run/snapshotter.sock");
        let (stop, rx) = oneshot::channel::<()>();
        let task = {
            let (store, socket) = (Arc::clone(&store), socket.clone());
            tokio::spawn(async move {
                grpc_services::serve(store, &socket, mode, None, async {
                    let _ = rx.await;
                })
                .await
                .map_err(|e| e.to_string())
            })
        };
        let mut waited = 0;
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            assert!(waited < 500, "the server did not come up");
            tokio::time::sleep(Duration::from_millis(10)).await;
            waited += 1;
        }
        let client = SnapshotsClient::new(containerd_client::connect(&socket).await.unwrap());
        Harness {
            socket,
            store,
            client,
            stop,
            task,
            dir,
        }
    }

    /// Stops the server (it must stop cleanly and remove its socket) and the store,
    /// which must leave nothing mounted (the directory's guard would clean up, but
    /// that is the test's safety net, not the product's).
    async fn finish(self) {
        self.stop.send(()).unwrap();
        let served = tokio::time::timeout(Duration::from_secs(20), self.task)
            .await
            .expect("server stops");
        served.unwrap().expect("serve returns Ok");
        assert!(!self.socket.exists(), "socket removed on shutdown");
        self.store.shutdown();
        let left = self.dir.mounts();
        assert!(left.is_empty(), "mounted after the store's shutdown: {left:?}");
        drop(self.dir);
    }

    async fn prepare(
        &self,
        key: &str,
        parent: &str,
        labels: &[(&str, &str)],
    ) -> Result<pb::PrepareSnapshotResponse, tonic::Status> {
        let r = pb::PrepareSnapshotRequest {
            snapshotter: "dedup".into(),
            key: key.into(),
            parent: parent.into(),
            labels: labels_of(labels),
        };
        self.client.clone().prepare(r).await.map(|r| r.into_inner())
    }

    async fn view(&self, key: &str, parent: &str) -> Result<pb::ViewSnapshotResponse, tonic::Status> {
        let r = pb::ViewSnapshotRequest {
            snapshotter: "dedup".into(),
            key: key.into(),
            parent: parent.into(),
            labels: HashMap::new(),
        };
        self.client.clone().view(r).await.map(|r| r.into_inner())
    }

    async fn commit(&self, name: &str, key: &str, labels: &[(&str, &str)]) -> Result<(), tonic::Status> {
        let r = pb::CommitSnapshotRequest {
            snapshotter: "dedup".into(),
            name: name.into(),
            key: key.into(),
            labels: labels_of(labels),
        };
        self.client.clone().commit(r).await.map(|_| ())
    }

    async fn stat(&self, key: &str) -> Result<pb::Info, tonic::Status> {
        let r = pb::StatSnapshotRequest {
            snapshotter: "dedup".into(),
            key: key.into(),
        };
        self.client
            .clone()
            .stat(r)
            .await
            .map(|r| r.into_inner().info.expect("Stat answers an info"))
    }

    async fn mounts(&self, key: &str) -> Result<pb::MountsResponse, tonic::Status> {
        let r = pb::MountsRequest {
            snapshotter: "dedup".into(),
            key: key.into(),
        };
        self.client.clone().mounts(r).await.map(|r| r.into_inner())
    }

    async fn remove(&self, key: &str) -> Result<(), tonic::Status> {
        let r = pb::RemoveSnapshotRequest {
            snapshotter: "dedup".into(),
            key: key.into(),
        };
        self.client.clone().remove(r).await.map(|_| ())
    }

    /// The List stream's messages.
    async fn list(&self, filters: &[&str]) -> Result<Vec<pb::ListSnapshotsResponse>, tonic::Status> {
        let r = pb::ListSnapshotsRequest {
            snapshotter: "dedup".into(),
            filters: filters.iter().map(|f| f.to_string()).collect(),
        };
        let mut stream = self.client.clone().list(r).await?.into_inner();
        let mut messages = Vec::new();
        while let Some(m) = stream.message().await? {
            messages.push(m);
        }
        Ok(messages)
    }

    /// The names List answers, sorted.
    async fn list_names(&self, filters: &[&str]) -> Vec<String> {
        let mut names: Vec<String> = self
            .list(filters)
            .await
            .unwrap_or_else(|e| panic!("List {filters:?}: {e}"))
            .into_iter()
            .flat_map(|m| m.info)
            .map(|i| i.name)
            .collect();
        names.sort();
        names
    }

    async fn update(&self, info: pb::Info, paths: &[&str]) -> Result<pb::Info, tonic::Status> {
        let r = pb::UpdateSnapshotRequest {
            snapshotter: "dedup".into(),
            info: Some(info),
            update_mask: (!paths.is_empty()).then(|| prost_types::FieldMask {
                paths: paths.iter().map(|p| p.to_string()).collect(),
            }),
        };
        self.client
            .clone()
            .update(r)
            .await
            .map(|r| r.into_inner().info.expect("Update answers an info"))
    }

    async fn usage(&self, key: &str) -> Result<pb::UsageResponse, tonic::Status> {
        let r = pb::UsageRequest {
            snapshotter: "dedup".into(),
            key: key.into(),
        };
        self.client.clone().usage(r).await.map(|r| r.into_inner())
    }
}

fn labels_of(labels: &[(&str, &str)]) -> HashMap<String, String> {
    labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

fn code<T: std::fmt::Debug>(r: Result<T, tonic::Status>) -> Code {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(s) => s.code(),
    }
}

/// The directory a single bind mount exposes (an active snapshot without parent).
fn bind_source(mounts: &[containerd_client::types::Mount]) -> PathBuf {
    assert_eq!(mounts.len(), 1, "{mounts:?}");
    assert_eq!(mounts[0].r#type, "bind", "{mounts:?}");
    PathBuf::from(&mounts[0].source)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_sets_the_socket_mode_and_stops_cleanly() {
    let h = Harness::start_with_mode(0o660).await;
    let meta = std::fs::symlink_metadata(&h.socket).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o7777, 0o660);
    // A second server on the same socket is refused while the first answers.
    let err = grpc_services::serve(Arc::clone(&h.store), &h.socket, 0o600, None, std::future::pending())
        .await
        .unwrap_err();
    assert_eq!(
        err.downcast_ref::<std::io::Error>().map(std::io::Error::kind),
        Some(std::io::ErrorKind::AddrInUse),
        "{err}"
    );
    assert_eq!(code(h.stat("nothing").await), Code::NotFound);
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepare_returns_the_store_mounts_and_stat_translates_the_info() {
    let h = Harness::start().await;
    let before = SystemTime::now() - Duration::from_secs(1);
    let resp = h
        .prepare("default/1/a", "", &[("containerd.io/gc.root", "x"), ("empty", "")])
        .await
        .unwrap();
    let mounts = &resp.mounts;
    // Exactly what the store says, field by field.
    let direct: Vec<_> = h
        .store
        .mounts("default/1/a")
        .unwrap()
        .into_iter()
        .map(mount_to_proto)
        .collect();
    assert_eq!(mounts, &direct);
    // A snapshot without parent is a writable directory (containerd's walking differ
    // mounts it and extracts a layer there).
    let src = bind_source(mounts);
    assert!(src.is_dir(), "{src:?}");
    assert!(mounts[0].options.iter().any(|o| o == "rw"), "{mounts:?}");
    // Mounts answers the same.
    assert_eq!(h.mounts("default/1/a").await.unwrap().mounts, direct);

    let info = h.stat("default/1/a").await.unwrap();
    assert_eq!(info.name, "default/1/a");
    assert_eq!(info.parent, "");
    assert_eq!(info.kind, pb::Kind::Active as i32);
    assert_eq!(info.labels, labels_of(&[("containerd.io/gc.root", "x"), ("empty", "")]));
    let created = SystemTime::try_from(info.created_at.unwrap()).unwrap();
    assert!(
        created >= before && created <= SystemTime::now() + Duration::from_secs(1),
        "{created:?}"
    );
    assert!(info.updated_at.is_some());
    assert_eq!(info, info_to_proto(h.store.stat("default/1/a").unwrap()));
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_codes_are_the_ones_containerd_expects() {
    let h = Harness::start().await;
    assert_eq!(code(h.stat("missing").await), Code::NotFound);
    assert_eq!(code(h.mounts("missing").await), Code::NotFound);
    assert_eq!(code(h.usage("missing").await), Code::NotFound);
    assert_eq!(code(h.remove("missing").await), Code::NotFound);
    assert_eq!(code(h.commit("name", "missing", &[]).await), Code::NotFound);
    assert_eq!(code(h.prepare("k", "no-such-parent", &[]).await), Code::NotFound);
    assert_eq!(code(h.prepare("", "", &[]).await), Code::InvalidArgument);

    h.prepare("k", "", &[]).await.unwrap();
    assert_eq!(code(h.prepare("k", "", &[]).await), Code::AlreadyExists);
    assert_eq!(code(h.view("k", "").await), Code::AlreadyExists);

    h.prepare("other", "", &[]).await.unwrap();
    h.commit("layer", "k", &[]).await.unwrap();
    // The name is taken now.
    assert_eq!(code(h.commit("layer", "other", &[]).await), Code::AlreadyExists);
    // The committed key is gone (it became "layer").
    assert_eq!(code(h.stat("k").await), Code::NotFound);
    // Committing a committed snapshot, or asking for its mounts: wrong state.
    assert_eq!(code(h.commit("again", "layer", &[]).await), Code::FailedPrecondition);
    assert_eq!(code(h.mounts("layer").await), Code::FailedPrecondition);

    // Only labels can change.
    let info = h.stat("layer").await.unwrap();
    assert_eq!(code(h.update(info.clone(), &["parent"]).await), Code::InvalidArgument);
    let missing = pb::Info {
        name: "missing".into(),
        ..info
    };
    assert_eq!(code(h.update(missing, &["labels"]).await), Code::NotFound);
    // An Update without info is malformed.
    let r = pb::UpdateSnapshotRequest {
        snapshotter: "dedup".into(),
        info: None,
        update_mask: None,
    };
    assert_eq!(code(h.client.clone().update(r).await), Code::InvalidArgument);
    // A filter that does not parse.
    assert_eq!(code(h.list(&["name=="]).await), Code::InvalidArgument);
    assert_eq!(
        code(h.list(&["kind==view", "labels.containerd.io/gc.root"]).await),
        Code::InvalidArgument
    );
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commit_then_build_on_it_and_remove_in_order() {
    let h = Harness::start().await;
    let resp = h.prepare("default/1/extract-1 sha256:aaa", "", &[]).await.unwrap();
    let upper = bind_source(&resp.mounts);
    // What containerd's walking differ does: write the layer into the mount.
    std::fs::create_dir(upper.join("etc")).unwrap();
    std::fs::write(upper.join("etc/hello"), b"hello from layer 1\n").unwrap();
    h.commit(
        "default/2/sha256:chain1",
        "default/1/extract-1 sha256:aaa",
        &[("containerd.io/snapshot.ref", "r")],
    )
    .await
    .unwrap();

    let info = h.stat("default/2/sha256:chain1").await.unwrap();
    assert_eq!(info.kind, pb::Kind::Committed as i32);
    assert_eq!(info.parent, "");
    assert_eq!(info.labels, labels_of(&[("containerd.io/snapshot.ref", "r")]));
    let usage = h.usage("default/2/sha256:chain1").await.unwrap();
    assert!(usage.size > 0, "{usage:?}");
    assert!(usage.inodes >= 2, "{usage:?}");

    // An active snapshot and a view over the committed layer.
    let active = h
        .prepare("default/3/container", "default/2/sha256:chain1", &[])
        .await
        .unwrap();
    assert_eq!(
        active.mounts,
        h.store
            .mounts("default/3/container")
            .unwrap()
            .into_iter()
            .map(mount_to_proto)
            .collect::<Vec<_>>()
    );
    let view = h.view("default/4/view", "default/2/sha256:chain1").await.unwrap();
    assert!(!view.mounts.is_empty());
    assert!(
        view.mounts
            .iter()
            .all(|m| m.options.iter().any(|o| o == "ro") || m.r#type == "overlay"),
        "{view:?}"
    );
    // The layer's content is what the view exposes (a single committed parent: a
    // read-only bind of the mounted EROFS layer).
    if view.mounts.len() == 1 && view.mounts[0].r#type == "bind" {
        let hello = std::fs::read(PathBuf::from(&view.mounts[0].source).join("etc/hello")).unwrap();
        assert_eq!(hello, b"hello from layer 1\n");
    }
    let v = h.stat("default/4/view").await.unwrap();
    assert_eq!(
        (v.kind, v.parent.as_str()),
        (pb::Kind::View as i32, "default/2/sha256:chain1")
    );
    let a = h.stat("default/3/container").await.unwrap();
    assert_eq!(
        (a.kind, a.parent.as_str()),
        (pb::Kind::Active as i32, "default/2/sha256:chain1")
    );

    // Children keep the parent alive.
    assert_eq!(
        code(h.remove("default/2/sha256:chain1").await),
        Code::FailedPrecondition
    );
    h.remove("default/3/container").await.unwrap();
    assert_eq!(
        code(h.remove("default/2/sha256:chain1").await),
        Code::FailedPrecondition
    );
    h.remove("default/4/view").await.unwrap();
    h.remove("default/2/sha256:chain1").await.unwrap();
    assert_eq!(code(h.stat("default/2/sha256:chain1").await), Code::NotFound);
    assert!(h.list_names(&[]).await.is_empty());

    // Cleanup has nothing to do, and says so without error.
    h.client
        .clone()
        .cleanup(pb::CleanupRequest {
            snapshotter: "dedup".into(),
        })
        .await
        .unwrap();
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_follows_the_field_mask() {
    let h = Harness::start().await;
    h.prepare("k", "", &[("keep", "1"), ("drop", "2"), ("change", "3")])
        .await
        .unwrap();
    let before = h.stat("k").await.unwrap();

    // One label set, one removed (absent from info but named in the mask); others kept.
    let mut info = before.clone();
    info.labels = labels_of(&[("change", "30"), ("new", "4")]);
    let got = h
        .update(info, &["labels.change", "labels.drop", "labels.new"])
        .await
        .unwrap();
    assert_eq!(got.labels, labels_of(&[("keep", "1"), ("change", "30"), ("new", "4")]));
    assert_eq!(got.name, "k");
    assert_eq!(got.kind, pb::Kind::Active as i32);
    assert_eq!(got.created_at, before.created_at);
    assert!(
        SystemTime::try_from(got.updated_at.unwrap()).unwrap()
            >= SystemTime::try_from(before.updated_at.unwrap()).unwrap()
    );
    assert_eq!(h.stat("k").await.unwrap().labels, got.labels);

    // `labels` replaces them all; so does an empty mask.
    let mut info = got.clone();
    info.labels = labels_of(&[("only", "x")]);
    assert_eq!(
        h.update(info, &["labels"]).await.unwrap().labels,
        labels_of(&[("only", "x")])
    );
    let mut info = got.clone();
    info.labels = labels_of(&[("containerd.io/gc.root", "t")]);
    assert_eq!(
        h.update(info, &[]).await.unwrap().labels,
        labels_of(&[("containerd.io/gc.root", "t")])
    );

    // The kind and parent in the request are ignored (immutable), not an error.
    let mut info = h.stat("k").await.unwrap();
    info.kind = pb::Kind::Unknown as i32;
    info.parent = "something".into();
    info.labels = labels_of(&[("a", "b")]);
    let got = h.update(info, &["labels.a"]).await.unwrap();
    assert_eq!((got.kind, got.parent.as_str()), (pb::Kind::Active as i32, ""));
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_filters_like_containerd() {
    let h = Harness::start().await;
    let resp = h.prepare("default/1/base-extract", "", &[]).await.unwrap();
    std::fs::write(bind_source(&resp.mounts).join("f"), b"x").unwrap();
    h.commit(
        "default/2/base",
        "default/1/base-extract",
        &[("containerd.io/gc.root", "2024"), ("team", "a")],
    )
    .await
    .unwrap();
    h.prepare("default/3/work", "default/2/base", &[("team", "b")])
        .await
        .unwrap();
    h.view("default/4/look", "default/2/base").await.unwrap();
    h.prepare("other/5/x", "", &[("foo.bar", "baz")]).await.unwrap();

    let all = ["default/2/base", "default/3/work", "default/4/look", "other/5/x"];
    assert_eq!(h.list_names(&[]).await, all);
    assert_eq!(h.list_names(&[""]).await, all);
    assert_eq!(h.list_names(&["kind==committed"]).await, ["default/2/base"]);
    assert_eq!(h.list_names(&["kind==active"]).await, ["default/3/work", "other/5/x"]);
    assert_eq!(h.list_names(&["kind==view"]).await, ["default/4/look"]);
    assert_eq!(
        h.list_names(&["parent==default/2/base"]).await,
        ["default/3/work", "default/4/look"]
    );
    assert_eq!(
        h.list_names(&["name~=^default/"]).await,
        ["default/2/base", "default/3/work", "default/4/look"]
    );
    assert_eq!(
        h.list_names(&[r#"labels."containerd.io/gc.root""#]).await,
        ["default/2/base"]
    );
    assert_eq!(h.list_names(&["labels.foo.bar==baz"]).await, ["other/5/x"]);
    // Comma: AND. Several filters: OR.
    assert_eq!(h.list_names(&["kind==active,labels.team==b"]).await, ["default/3/work"]);
    assert!(h.list_names(&["kind==view,labels.team==b"]).await.is_empty());
    assert_eq!(
        h.list_names(&["kind==view", "labels.team==b"]).await,
        ["default/3/work", "default/4/look"]
    );
    assert_eq!(
        h.list_names(&["labels.team!=a"]).await,
        ["default/3/work", "default/4/look", "other/5/x"]
    );

    // Many snapshots arrive in messages of at most 100.
    for n in 0..205 {
        h.view(&format!("many/{n:03}"), "").await.unwrap();
    }
    let messages = h.list(&["name~=^many/"]).await.unwrap();
    let sizes: Vec<_> = messages.iter().map(|m| m.info.len()).collect();
    assert_eq!(sizes, [100, 100, 5]);
    let mut names: Vec<_> = messages.into_iter().flat_map(|m| m.info).map(|i| i.name).collect();
    names.sort();
    names.dedup();
    assert_eq!(names.len(), 205);
    // Nothing matching: the stream just ends.
    assert!(h.list(&["name==nothing"]).await.unwrap().is_empty());
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn labels_survive_the_round_trip_through_the_wire() {
    let h = Harness::start().await;
    let mut labels: BTreeMap<String, String> = BTreeMap::new();
    labels.insert("containerd.io/snapshot/cri.layer-digest".into(), "sha256:0123".into());
    labels.insert("unicode ✓".into(), "é\n\"quoted\"".into());
    let pairs: Vec<(&str, &str)> = labels.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    h.prepare("k", "", &pairs).await.unwrap();
    assert_eq!(h.store.stat("k").unwrap().labels, labels);
    assert_eq!(h.list_names(&[r#"labels."unicode ✓"=="é\n\"quoted\"""#]).await, ["k"]);
    h.finish().await;
}
