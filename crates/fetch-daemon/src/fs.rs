//! The FUSE file system: a read-only root directory with one regular file per registered blob.

use std::ffi::OsStr;
use std::io;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, KernelConfig, LockOwner,
    OpenAccMode, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEntry, ReplyOpen, ReplyStatfs, Request,
};
use tracing::warn;

use crate::daemon::{Blob, Daemon, ROOT_INO};

/// Attributes and entries never change while a blob is registered (its content is fixed by its
/// digest), so the kernel may keep them long; an unregistered blob's entry is invalidated explicitly.
const TTL: Duration = Duration::from_secs(24 * 3600);

/// How many reads can wait for fetches at once. Reads of cached chunks finish quickly, so this
/// mostly bounds reads stuck on a slow or failing registry (each until its deadline).
const READ_WORKERS: usize = 32;

type Job = Box<dyn FnOnce() + Send>;

/// Threads that answer reads, so that a read waiting for the network never holds up the FUSE loop
/// (lookups, getattr, reads of cached data).
struct Workers {
    tx: Mutex<mpsc::Sender<Job>>,
}

impl Workers {
    fn new(n: usize) -> Workers {
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..n {
            let rx = rx.clone();
            std::thread::Builder::new()
                .name(format!("read-{i}"))
                .spawn(move || loop {
                    let job = rx.lock().unwrap_or_else(|e| e.into_inner()).recv();
                    match job {
                        Ok(job) => job(),
                        Err(_) => return,
                    }
                })
                .expect("cannot start read worker threads");
        }
        Workers { tx: Mutex::new(tx) }
    }

    fn run(&self, job: Job) {
        let _ = self.tx.lock().unwrap_or_else(|e| e.into_inner()).send(job);
    }
}

/// The [`fuser::Filesystem`] over a [`Daemon`].
pub struct BlobFs {
    daemon: Arc<Daemon>,
    workers: Workers,
    /// Times shown on every file: the content never changes, so neither do they.
    time: SystemTime,
}

impl BlobFs {
    /// The file system of `daemon`, with its read workers started.
    pub fn new(daemon: Arc<Daemon>) -> BlobFs {
        BlobFs {
            daemon,
            workers: Workers::new(READ_WORKERS),
            time: SystemTime::UNIX_EPOCH,
        }
    }

    fn attr(&self, ino: u64, kind: FileType, size: u64, perm: u16, nlink: u32) -> FileAttr {
        FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: self.time,
            mtime: self.time,
            ctime: self.time,
            crtime: self.time,
            kind,
            perm,
            nlink,
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }

    fn root_attr(&self) -> FileAttr {
        self.attr(ROOT_INO, FileType::Directory, 0, 0o555, 2)
    }

    fn blob_attr(&self, blob: &Blob) -> FileAttr {
        self.attr(blob.ino, FileType::RegularFile, blob.spec.size, 0o444, 1)
    }
}

impl Filesystem for BlobFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        // The kernel allows at most this much; larger readahead means fewer, larger FUSE reads.
        let _ = config
            .set_max_readahead(u32::MAX)
            .or_else(|max| config.set_max_readahead(max));
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if parent.0 != ROOT_INO {
            return reply.error(Errno::ENOENT);
        }
        match name.to_str().and_then(|n| self.daemon.blob_by_name(n)) {
            Some(blob) => reply.entry(&TTL, &self.blob_attr(&blob), Generation(0)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        if ino.0 == ROOT_INO {
            return reply.attr(&TTL, &self.root_attr());
        }
        match self.daemon.blob_by_ino(ino.0) {
            Some(blob) => reply.attr(&TTL, &self.blob_attr(&blob)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if !matches!(flags.acc_mode(), OpenAccMode::O_RDONLY) {
            return reply.error(Errno::EROFS);
        }
        if self.daemon.blob_by_ino(ino.0).is_none() {
            return reply.error(Errno::ENOENT);
        }
        // The content of a digest never changes: the page cache stays valid across opens.
        reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE);
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let Some(blob) = self.daemon.blob_by_ino(ino.0) else {
            return reply.error(Errno::ENOENT);
        };
        // Recorded here, on the FUSE loop, so the trace keeps the kernel's order.
        self.daemon.record_access(&blob, offset, u64::from(size));
        let daemon = self.daemon.clone();
        self.workers
            .run(Box::new(move || match daemon.read(&blob, offset, size) {
                Ok(data) => reply.data(&data),
                Err(_) => reply.error(Errno::EIO),
            }));
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        if ino.0 != ROOT_INO {
            return reply.error(Errno::ENOTDIR);
        }
        reply.opened(FileHandle(0), FopenFlags::empty());
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        if ino.0 != ROOT_INO {
            return reply.error(Errno::ENOTDIR);
        }
        // Offsets are positions in the sorted listing; a blob registered between two calls may shift
        // it by one, which readdir semantics allow.
        let blobs = self.daemon.all_blobs();
        let entries = [
            (ROOT_INO, FileType::Directory, ".".to_string()),
            (ROOT_INO, FileType::Directory, "..".to_string()),
        ]
        .into_iter()
        .chain(blobs.iter().map(|b| (b.ino, FileType::RegularFile, b.file_name())));
        for (i, (ino, kind, name)) in entries.enumerate().skip(offset as usize) {
            if reply.add(INodeNo(ino), i as u64 + 1, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let blobs = self.daemon.all_blobs();
        let bytes: u64 = blobs.iter().map(|b| b.spec.size).sum();
        reply.statfs(bytes.div_ceil(4096), 0, 0, blobs.len() as u64 + 1, 0, 4096, 255, 4096);
    }
}

/// Detaches a dead FUSE mount left at `mountpoint` by a killed instance (stat fails with ENOTCONN).
pub fn clear_dead_mount(mountpoint: &std::path::Path) -> io::Result<()> {
    // A stat alone may be answered from attributes the kernel cached while the old
    // instance lived (long TTLs); listing the directory always asks the daemon.
    let probe = std::fs::metadata(mountpoint).and_then(|_| std::fs::read_dir(mountpoint).map(|_| ()));
    match probe {
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => {
            warn!(mountpoint = %mountpoint.display(), "detaching the dead mount of a previous instance");
            rustix::mount::unmount(mountpoint, rustix::mount::UnmountFlags::DETACH)?;
            Ok(())
        }
        _ => Ok(()),
    }
}
