//! A client of containerd's content store, dialled back over containerd's socket.
//!
//! Every call carries the caller's namespace and lease (gRPC metadata
//! `containerd-namespace`, `containerd-lease`): without the lease, a blob that
//! Compare writes is garbage-collected before the client can use it.

use std::collections::HashMap;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use containerd_client::services::v1::content_client::ContentClient;
use containerd_client::services::v1::{
    AbortRequest, Info, ReadContentRequest, UpdateRequest, WriteAction, WriteContentRequest,
};
use containerd_client::tonic::transport::Channel;
use containerd_client::tonic::{self, Code, Request};
use tokio::sync::OnceCell;

use crate::{DiffError, Result};

/// Whose request this is: containerd's namespace and the client's lease.
#[derive(Debug, Clone, Default)]
pub struct CallContext {
    /// `containerd-namespace` of the incoming request.
    pub namespace: String,
    /// `containerd-lease` of the incoming request, if any.
    pub lease: Option<String>,
}

impl CallContext {
    fn request<T>(&self, msg: T) -> Request<T> {
        let mut req = Request::new(msg);
        let md = req.metadata_mut();
        if let Ok(v) = self.namespace.parse() {
            md.insert("containerd-namespace", v);
        }
        if let Some(Ok(v)) = self.lease.as_ref().map(|l| l.parse()) {
            md.insert("containerd-lease", v);
        }
        req
    }
}

/// containerd's content store, connected on first use (containerd may start after
/// the daemon).
pub struct ContentStore {
    address: PathBuf,
    channel: OnceCell<Channel>,
}

fn status(what: &str, s: tonic::Status) -> DiffError {
    let msg = format!("{what}: {}", s.message());
    match s.code() {
        Code::NotFound => DiffError::NotFound(msg),
        Code::AlreadyExists => DiffError::AlreadyExists(msg),
        Code::InvalidArgument => DiffError::InvalidArgument(msg),
        Code::FailedPrecondition => DiffError::FailedPrecondition(msg),
        _ => DiffError::Internal(msg),
    }
}

impl ContentStore {
    /// A store reached through containerd's socket at `address`.
    pub fn new(address: &Path) -> ContentStore {
        ContentStore {
            address: address.to_path_buf(),
            channel: OnceCell::new(),
        }
    }

    async fn client(&self) -> Result<ContentClient<Channel>> {
        let ch = self
            .channel
            .get_or_try_init(|| async {
                containerd_client::connect(&self.address).await.map_err(|e| {
                    DiffError::Internal(format!("connecting to containerd at {}: {e}", self.address.display()))
                })
            })
            .await?;
        Ok(ContentClient::new(ch.clone()).max_decoding_message_size(64 << 20))
    }

    /// Streams a blob. The returned reader is blocking (for the converter's threads);
    /// a task on the current runtime pulls the gRPC stream into it.
    pub async fn reader(&self, ctx: &CallContext, digest: &str) -> Result<BlobReader> {
        let mut client = self.client().await?;
        let req = ctx.request(ReadContentRequest {
            digest: digest.to_string(),
            offset: 0,
            size: 0,
        });
        let mut stream = client
            .read(req)
            .await
            .map_err(|s| status(&format!("reading blob {digest}"), s))?
            .into_inner();
        // The reader side blocks in a converter thread (`blocking_recv`); this task only
        // awaits, so the runtime is never blocked.
        let (tx, rx) = tokio::sync::mpsc::channel::<io::Result<Vec<u8>>>(16);
        let digest = digest.to_string();
        tokio::spawn(async move {
            loop {
                let item = match stream.message().await {
                    Ok(Some(m)) => Ok(m.data),
                    Ok(None) => return,
                    Err(s) => Err(io::Error::other(format!("reading blob {digest}: {}", s.message()))),
                };
                let failed = item.is_err();
                if tx.send(item).await.is_err() || failed {
                    return;
                }
            }
        });
        Ok(BlobReader {
            rx,
            buf: Vec::new(),
            pos: 0,
        })
    }

    /// Writes a blob from `chunks` (sent by a blocking producer), committing it as
    /// `expected` once the producer is done. A ref that already holds data is
    /// aborted first (containerd's Truncate); a blob that already exists is not an
    /// error — its labels are brought up to date instead.
    pub async fn write(
        &self,
        ctx: &CallContext,
        reference: &str,
        truncate: bool,
        mut chunks: tokio::sync::mpsc::Receiver<Vec<u8>>,
        finish: tokio::sync::oneshot::Receiver<(String, i64, HashMap<String, String>)>,
    ) -> Result<()> {
        let mut client = self.client().await?;
        if truncate {
            match client
                .abort(ctx.request(AbortRequest {
                    r#ref: reference.to_string(),
                }))
                .await
            {
                Ok(_) => {}
                Err(s) if s.code() == Code::NotFound => {}
                Err(s) => return Err(status("aborting an earlier write", s)),
            }
        }
        let (req_tx, req_rx) = tokio::sync::mpsc::channel::<WriteContentRequest>(4);
        let stream = tokio_stream::wrappers::ReceiverStream::new(req_rx);
        let reference_owned = reference.to_string();
        let feeder = tokio::spawn(async move {
            let mut offset = 0i64;
            while let Some(data) = chunks.recv().await {
                let len = data.len() as i64;
                let msg = WriteContentRequest {
                    action: WriteAction::Write as i32,
                    r#ref: reference_owned.clone(),
                    offset,
                    data,
                    ..Default::default()
                };
                if req_tx.send(msg).await.is_err() {
                    return None;
                }
                offset += len;
            }
            let (expected, total, labels) = finish.await.ok()?;
            let msg = WriteContentRequest {
                action: WriteAction::Commit as i32,
                r#ref: reference_owned,
                total,
                expected: expected.clone(),
                offset,
                labels: labels.clone(),
                ..Default::default()
            };
            req_tx.send(msg).await.ok()?;
            Some((expected, labels))
        });
        let result = async {
            let mut responses = client.write(ctx.request(stream)).await?.into_inner();
            loop {
                match responses.message().await {
                    Ok(Some(r)) if r.action == WriteAction::Commit as i32 => return Ok(()),
                    Ok(Some(_)) => continue,
                    Ok(None) => return Ok(()),
                    Err(s) => return Err(s),
                }
            }
        }
        .await;
        let committed = feeder.await.ok().flatten();
        match (result, committed) {
            (Ok(()), Some(_)) => Ok(()),
            (Ok(()), None) => Err(DiffError::Internal("the layer writer stopped before committing".into())),
            (Err(s), Some((digest, labels))) if s.code() == Code::AlreadyExists => {
                self.update_labels(ctx, &digest, labels).await
            }
            (Err(s), _) => {
                let _ = client
                    .abort(ctx.request(AbortRequest {
                        r#ref: reference.to_string(),
                    }))
                    .await;
                Err(status("writing the layer to the content store", s))
            }
        }
    }

    async fn update_labels(&self, ctx: &CallContext, digest: &str, labels: HashMap<String, String>) -> Result<()> {
        if labels.is_empty() || digest.is_empty() {
            return Ok(());
        }
        let mut client = self.client().await?;
        let paths = labels.keys().map(|k| format!("labels.{k}")).collect();
        let req = UpdateRequest {
            info: Some(Info {
                digest: digest.to_string(),
                labels,
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask { paths }),
        };
        client
            .update(ctx.request(req))
            .await
            .map_err(|s| status("labelling an existing blob", s))?;
        Ok(())
    }

    /// A lease of its own that expires after `ttl`, for a write whose caller's lease
    /// did not reach us: containerd 2.x forwards the namespace to proxy differs but
    /// not the client's lease, and a blob written with no lease is collected by the
    /// next garbage collection, before the client can read it. Expiring, it holds
    /// the blob only until the client has referenced it (or given up).
    pub async fn expiring_lease(&self, ctx: &CallContext, ttl: std::time::Duration) -> Result<String> {
        self.client().await?;
        let channel = self.channel.get().expect("connected by client()").clone();
        let mut leases = containerd_client::services::v1::leases_client::LeasesClient::new(channel);
        let id = format!("dedup-diff-{}-{}", std::process::id(), unique_suffix());
        let labels = HashMap::from([(
            "containerd.io/gc.expire".to_string(),
            rfc3339(std::time::SystemTime::now() + ttl),
        )]);
        leases
            .create(ctx.request(containerd_client::services::v1::CreateRequest { id: id.clone(), labels }))
            .await
            .map_err(|s| status("creating a lease for the layer", s))?;
        Ok(id)
    }

    /// Aborts an unfinished write.
    pub async fn abort(&self, ctx: &CallContext, reference: &str) {
        if let Ok(mut c) = self.client().await {
            let _ = c
                .abort(ctx.request(AbortRequest {
                    r#ref: reference.to_string(),
                }))
                .await;
        }
    }
}

/// A blocking reader over a blob streamed from the content store.
pub struct BlobReader {
    rx: tokio::sync::mpsc::Receiver<io::Result<Vec<u8>>>,
    buf: Vec<u8>,
    pos: usize,
}

impl Read for BlobReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.pos >= self.buf.len() {
            match self.rx.blocking_recv() {
                Some(Ok(chunk)) => {
                    self.buf = chunk;
                    self.pos = 0;
                }
                Some(Err(e)) => return Err(e),
                None => return Ok(0),
            }
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

fn unique_suffix() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

/// RFC 3339 in UTC (`2026-12-04T13:00:00Z`), what containerd's `gc.expire` label takes.
pub fn rfc3339(t: std::time::SystemTime) -> String {
    let secs = t.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Days since 1970-01-01 to a civil date (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::rfc3339;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn rfc3339_dates() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(951_782_400 + 3661)),
            "2000-02-29T01:01:01Z"
        );
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(1_796_342_400)),
            "2026-12-04T00:00:00Z"
        );
    }
}
