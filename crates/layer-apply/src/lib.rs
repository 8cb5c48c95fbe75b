//! Applies an OCI layer tar onto a directory: the walking differ's Apply.
//!
//! Semantics follow containerd's `archive.Apply` (pkg/archive/tar.go, containerd 1.6):
//! implied parents are created with mode 0755, whatever already exists at a path is
//! replaced (a directory is kept and merged when the entry is a directory too),
//! ownership, modes, xattrs and sub-second times are restored exactly, directory times
//! are set last, and whiteouts are either carried out (OCI mode: the target is a plain
//! directory) or turned into overlayfs whiteouts (Overlay mode: the target is an
//! overlayfs upper directory).
//!
//! Where the converter (layer-convert) must agree, the rules are shared or mirrored, so a
//! layer means the same through every path (tests/edges.rs checks them against each
//! other, against GNU tar and under the kernel's overlayfs):
//! * entry names are read by [`oci_layer::name`]: every spelling of the root is the
//!   root, and a directory entry for it sets the root's metadata (GNU tar does); `..`
//!   components and whiteouts of nothing, `.` or `..` are refused;
//! * a whiteout hides lower layers' content only (OCI image spec): an entry of this
//!   layer with the same name stays, before or after the whiteout, and a directory of
//!   this layer loses only what the lower layers held in it (made opaque in Overlay
//!   mode); an opaque marker likewise keeps this layer's entries;
//! * a hard link to a name it already is (itself, or the same link twice) changes
//!   nothing, as with GNU tar;
//! * a time the target file system cannot store (outside 1901..2446 on ext4) is refused
//!   rather than clamped.
//!
//! Safety: every file system operation is relative to a descriptor of the root. Parent
//! directories are resolved with `openat2(RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)`, so a
//! symlink in the layer or already in the target is followed *inside* the root (as
//! containerd's `fs.RootPath` does) and can never lead a write outside it; the last
//! component is never followed (`O_NOFOLLOW`, `AT_SYMLINK_NOFOLLOW`, create-exclusive
//! after removing what was there).
//!
//! ```no_run
//! use layer_apply::{apply_tar, ApplyOptions, Whiteouts};
//! let tar = std::io::BufReader::new(std::fs::File::open("layer.tar")?);
//! let stats = apply_tar(tar, "/snapshots/7/fs".as_ref(), &ApplyOptions { whiteouts: Whiteouts::Oci, ..Default::default() })?;
//! println!("{} entries, {} bytes", stats.entries, stats.bytes);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::collections::{HashSet, VecDeque};
use std::ffi::OsString;
use std::fs::File;
use std::io::{BufRead, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStringExt;
use std::path::Path;

use oci_layer::name::{self, Target};
use oci_layer::tar::{Entry, Kind, TarReader};
pub use oci_layer::{Error, ErrorKind};
use rustix::fs::{
    chmodat, chownat, fchmod, fchown, fsetxattr, fstat, futimens, linkat, lsetxattr, makedev, mkdirat, mknodat, openat,
    openat2, readlinkat, statat, symlinkat, unlinkat, utimensat, AtFlags, Dir, FileType, Gid, Mode, OFlags,
    ResolveFlags, Stat, Timestamps, Uid, XattrFlags,
};

use rustix::io::Errno;

/// How whiteout entries (`.wh.NAME`, `.wh..wh..opq`) are applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Whiteouts {
    /// The target is a plain directory holding the lower layers: `.wh.NAME` deletes
    /// NAME, `.wh..wh..opq` deletes what its directory held before this layer.
    #[default]
    Oci,
    /// The target is an (unmounted) overlayfs upper directory: `.wh.NAME` becomes a
    /// character device 0/0 named NAME, `.wh..wh..opq` sets `trusted.overlay.opaque=y`
    /// on its directory. `trusted.overlay.*` xattrs from the tar are skipped.
    Overlay,
}

/// Options for [`apply_tar`].
#[derive(Debug, Clone, Default)]
pub struct ApplyOptions {
    /// How whiteouts are applied.
    pub whiteouts: Whiteouts,
    /// In an overlay upper dir: the layers below, for the directories this layer implies
    /// (parents it has no entry for). containerd applies a layer inside the overlay of its
    /// lowers, where a file written under such a directory copies it up with its lower
    /// attributes; an upper dir applied to directly must do the same, or the 0755 it would
    /// invent hides a lower `root/`'s 0700. Empty (the default): implied directories are
    /// 0755.
    pub lower: layer_convert::Lowers,
}

/// What [`apply_tar`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ApplyStats {
    /// Tar entries read (whiteouts and skipped entries included; PAX and GNU
    /// extension headers are folded into their entry and not counted).
    pub entries: u64,
    /// Regular-file content bytes written.
    pub bytes: u64,
}

/// Body copy buffer; bodies are written in chunks of this size.
const COPY_BUF: usize = 1 << 20;
/// A slice of the reader's own buffer at least this big is written without copying.
const DIRECT_WRITE: usize = 256 << 10;
/// Symlinks followed while creating one entry's implied parents.
const MAX_SYMLINK_HOPS: u32 = 40;

/// Applies the uncompressed layer tar `src` onto the directory `root`.
///
/// Stops at the first error, which names the entry and its offset; what was applied
/// until then stays (the caller discards the snapshot).
pub fn apply_tar<R: BufRead>(src: R, root: &Path, opts: &ApplyOptions) -> Result<ApplyStats, Error> {
    let root_fd = openat(
        rustix::fs::CWD,
        root,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| io_err(e, format!("opening the target directory {}", root.display())))?;
    let mut a = Applier {
        root: root_fd,
        whiteouts: opts.whiteouts,
        lower: opts.lower.clone(),
        ours: HashSet::new(),
        opaque: HashSet::new(),
        dirs: Vec::new(),
        buf: Vec::new(),
        stats: ApplyStats::default(),
    };
    let mut reader = TarReader::new(src);
    while let Some(e) = reader.next_entry()? {
        a.stats.entries += 1;
        a.entry(&mut reader, &e)
            .map_err(|err| err.entry(&e.display_path()).at(e.offset))?;
    }
    a.finish_dirs()?;
    Ok(a.stats)
}

/// Key of a directory entry: (device, inode of the directory, name).
type Key = (u64, u64, Vec<u8>);

struct Applier {
    root: OwnedFd,
    whiteouts: Whiteouts,
    lower: layer_convert::Lowers,
    /// Directory entries this layer created or replaced (kept by an opaque whiteout).
    /// Keyed by the parent directory's inode rather than by path so that writes through
    /// symlinks are recognised whatever path reached them.
    ours: HashSet<Key>,
    /// (device, inode) of the directories this layer made opaque (Overlay mode): the
    /// whiteouts below them have nothing to hide.
    opaque: HashSet<(u64, u64)>,
    /// Directories whose times are set at the end: (cleaned path, mtime, nsec).
    dirs: Vec<(Vec<u8>, i64, u32)>,
    buf: Vec<u8>,
    stats: ApplyStats,
}

fn io_err(e: Errno, what: impl std::fmt::Display) -> Error {
    let mut err = Error::io(std::io::Error::from(e));
    err.message = format!("{what}: {}", err.message);
    err
}

fn lossy(b: &[u8]) -> std::borrow::Cow<'_, str> {
    String::from_utf8_lossy(b)
}

fn join(comps: &[&[u8]]) -> Vec<u8> {
    let mut p = Vec::new();
    for c in comps {
        if !p.is_empty() {
            p.push(b'/');
        }
        p.extend_from_slice(c);
    }
    p
}

fn file_type(st: &Stat) -> FileType {
    FileType::from_raw_mode(st.st_mode)
}

fn lstat_at(dir: BorrowedFd<'_>, name: &[u8]) -> Result<Option<Stat>, Errno> {
    match statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => Ok(Some(st)),
        Err(Errno::NOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Lists a directory's entries (without `.` and `..`).
fn list_dir(dir: BorrowedFd<'_>) -> Result<Vec<(Vec<u8>, FileType)>, Errno> {
    let mut out = Vec::new();
    let mut d = Dir::read_from(dir)?;
    while let Some(ent) = d.read() {
        let ent = ent?;
        let name = ent.file_name().to_bytes();
        if name == b"." || name == b".." {
            continue;
        }
        out.push((name.to_vec(), ent.file_type()));
    }
    Ok(out)
}

fn open_subdir(dir: BorrowedFd<'_>, name: &[u8]) -> Result<OwnedFd, Errno> {
    openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
}

/// Removes `name` in `dir` whatever it is, recursively for directories; never follows
/// symlinks.
fn remove_all_at(dir: BorrowedFd<'_>, name: &[u8]) -> Result<(), Errno> {
    let st = match lstat_at(dir, name)? {
        Some(st) => st,
        None => return Ok(()),
    };
    if file_type(&st) != FileType::Directory {
        return match unlinkat(dir, name, AtFlags::empty()) {
            Err(Errno::NOENT) => Ok(()),
            r => r,
        };
    }
    let sub = open_subdir(dir, name)?;
    for (child, _) in list_dir(sub.as_fd())? {
        remove_all_at(sub.as_fd(), &child)?;
    }
    drop(sub);
    match unlinkat(dir, name, AtFlags::REMOVEDIR) {
        Err(Errno::NOENT) => Ok(()),
        r => r,
    }
}

/// `/proc/self/fd/DIR/NAME`, to reach a non-regular file's xattrs without following it
/// (`lsetxattr` does not follow the last component; `DIR` is our own descriptor).
fn proc_path(dir: BorrowedFd<'_>, name: &[u8]) -> OsString {
    use std::os::fd::AsRawFd;
    let mut p = format!("/proc/self/fd/{}/", dir.as_raw_fd()).into_bytes();
    p.extend_from_slice(name);
    OsString::from_vec(p)
}

fn id(v: u64, what: &str) -> Result<u32, Error> {
    u32::try_from(v).map_err(|_| Error::new(ErrorKind::Unsupported, format!("{what} {v} does not fit in 32 bits")))
}

fn times(e: &Entry) -> Timestamps {
    let ts = rustix::fs::Timespec {
        tv_sec: e.mtime,
        tv_nsec: e.mtime_nsec.min(999_999_999) as _,
    };
    Timestamps {
        last_access: ts,
        last_modification: ts,
    }
}

/// Where an xattr is set.
enum XattrTarget<'a> {
    Fd(BorrowedFd<'a>),
    At(BorrowedFd<'a>, &'a [u8]),
}

impl Applier {
    /// Opens a directory of the root by path, resolving symlinks inside the root.
    fn open_in_root(&self, path: &[u8], flags: OFlags) -> Result<OwnedFd, Errno> {
        let p: &[u8] = if path.is_empty() { b"." } else { path };
        let mut tries = 0;
        loop {
            match openat2(
                &self.root,
                p,
                flags | OFlags::CLOEXEC,
                Mode::empty(),
                ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS,
            ) {
                // The kernel asks for a retry when a rename raced a ".." lookup.
                Err(Errno::AGAIN) if tries < 16 => tries += 1,
                r => return r,
            }
        }
    }

    fn open_dir_in_root(&self, path: &[u8]) -> Result<OwnedFd, Errno> {
        self.open_in_root(path, OFlags::PATH | OFlags::DIRECTORY)
    }

    fn mark(&mut self, dir: BorrowedFd<'_>, name: &[u8]) -> Result<(), Errno> {
        let st = fstat(dir)?;
        self.ours.insert((st.st_dev, st.st_ino, name.to_vec()));
        Ok(())
    }

    /// Gives the implied directory `name` in `dir` the owner and xattrs of the lower one.
    fn copy_up(&self, dir: BorrowedFd<'_>, name: &[u8], l: &erofs::writer::Meta) -> Result<(), Errno> {
        chownat(
            dir,
            name,
            Some(Uid::from_raw(l.uid)),
            Some(Gid::from_raw(l.gid)),
            AtFlags::SYMLINK_NOFOLLOW,
        )?;
        if !l.xattrs.is_empty() {
            let d = openat(
                dir,
                name,
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )?;
            for x in &l.xattrs {
                fsetxattr(&d, x.name().as_slice(), &x.value, XattrFlags::empty())?;
            }
        }
        // chown clears the set-id bits: set the mode again.
        chmodat(dir, name, Mode::from_raw_mode(u32::from(l.perm)), AtFlags::empty())
    }

    /// Resolves (creating when missing, mode 0755) the parent directory `comps`,
    /// following symlinks inside the root as containerd's `mkparent` does.
    fn parent(&mut self, comps: &[&[u8]]) -> Result<OwnedFd, Error> {
        let path = join(comps);
        match self.open_dir_in_root(&path) {
            Ok(fd) => return Ok(fd),
            Err(Errno::NOENT) => {}
            // In an upper dir, a whiteout of this layer in the way becomes a directory
            // (found by the walk below).
            Err(Errno::NOTDIR) if self.whiteouts == Whiteouts::Overlay => {}
            Err(Errno::NOTDIR) => return Err(not_a_dir(&path)),
            Err(e) => return Err(io_err(e, format!("opening directory {:?}", lossy(&path)))),
        }
        // Walk component by component, creating what is missing. A component that
        // is a dangling symlink is replaced by its target (resolved by the kernel,
        // inside the root), so the directories are created where the link points.
        let mut rest: VecDeque<Vec<u8>> = comps.iter().map(|c| c.to_vec()).collect();
        let mut prefix: Vec<u8> = Vec::new();
        let mut cur = self
            .open_dir_in_root(b"")
            .map_err(|e| io_err(e, "opening the target directory"))?;
        let mut hops = 0;
        while let Some(c) = rest.pop_front() {
            let mut next = prefix.clone();
            if !next.is_empty() {
                next.push(b'/');
            }
            next.extend_from_slice(&c);
            match self.open_dir_in_root(&next) {
                Ok(fd) => {
                    cur = fd;
                    prefix = next;
                    continue;
                }
                Err(Errno::NOENT | Errno::NOTDIR) => {}
                Err(e) => return Err(io_err(e, format!("opening directory {:?}", lossy(&next)))),
            }
            let st = lstat_at(cur.as_fd(), &c).map_err(|e| io_err(e, format!("stat {:?}", lossy(&next))))?;
            let whiteout_in_the_way = self.whiteouts == Whiteouts::Overlay
                && st.as_ref().is_some_and(is_whiteout_dev)
                && self.is_ours(cur.as_fd(), &c).map_err(|e| io_err(e, "stat"))?;
            if whiteout_in_the_way {
                // This layer deleted the lower entry and now puts a directory there: an
                // opaque one, as the converter makes it.
                unlinkat(cur.as_fd(), c.as_slice(), AtFlags::empty())
                    .map_err(|e| io_err(e, format!("replacing the whiteout {:?}", lossy(&next))))?;
            }
            match if whiteout_in_the_way { None } else { st } {
                None => {
                    match mkdirat(cur.as_fd(), c.as_slice(), Mode::from_raw_mode(0o755)) {
                        Ok(()) | Err(Errno::EXIST) => {}
                        Err(e) => return Err(io_err(e, format!("creating directory {:?}", lossy(&next)))),
                    }
                    // mkdir is subject to the umask; implied directories are 0755, or what
                    // the layers below show (never over a whiteout: the lower one is gone).
                    let lower = match self.whiteouts {
                        Whiteouts::Overlay if !whiteout_in_the_way => {
                            let parts: Vec<&[u8]> = next.split(|&b| b == b'/').filter(|p| !p.is_empty()).collect();
                            self.lower.dir_meta(&parts)
                        }
                        _ => None,
                    };
                    let mode = lower.as_ref().map_or(0o755, |l| u32::from(l.perm));
                    chmodat(cur.as_fd(), c.as_slice(), Mode::from_raw_mode(mode), AtFlags::empty())
                        .map_err(|e| io_err(e, format!("chmod {:?}", lossy(&next))))?;
                    if let Some(l) = &lower {
                        self.copy_up(cur.as_fd(), &c, l)
                            .map_err(|e| io_err(e, format!("copying the attributes of {:?}", lossy(&next))))?;
                    }
                    self.mark(cur.as_fd(), &c).map_err(|e| io_err(e, "stat"))?;
                    if whiteout_in_the_way {
                        let d = open_subdir(cur.as_fd(), &c)
                            .map_err(|e| io_err(e, format!("opening directory {:?}", lossy(&next))))?;
                        self.make_opaque(d.as_fd())
                            .map_err(|e| io_err(e, format!("making {:?} opaque", lossy(&next))))?;
                    }
                    cur = openat(
                        cur.as_fd(),
                        c.as_slice(),
                        OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                        Mode::empty(),
                    )
                    .map_err(|e| io_err(e, format!("opening directory {:?}", lossy(&next))))?;
                    prefix = next;
                }
                Some(st) if file_type(&st) == FileType::Symlink => {
                    hops += 1;
                    if hops > MAX_SYMLINK_HOPS {
                        return Err(io_err(Errno::LOOP, format!("resolving {:?}", lossy(&path))));
                    }
                    let target = readlinkat(cur.as_fd(), c.as_slice(), Vec::new())
                        .map_err(|e| io_err(e, format!("readlink {:?}", lossy(&next))))?
                        .into_bytes();
                    if target.starts_with(b"/") {
                        prefix.clear();
                        cur = self
                            .open_dir_in_root(b"")
                            .map_err(|e| io_err(e, "opening the target directory"))?;
                    }
                    for t in target.split(|&b| b == b'/').filter(|t| !t.is_empty()).rev() {
                        rest.push_front(t.to_vec());
                    }
                }
                // Appeared or changed under us.
                Some(_) => return Err(not_a_dir(&next)),
            }
        }
        Ok(cur)
    }

    fn entry<R: BufRead>(&mut self, reader: &mut TarReader<R>, e: &Entry) -> Result<(), Error> {
        let kind = e
            .kind
            .ok_or_else(|| Error::new(ErrorKind::Unsupported, "entry without a type"))?;
        let (parent, name) = match e.target()? {
            Target::Root => return self.root_entry(e, kind),
            Target::AufsMeta => return Ok(()),
            Target::Opaque { dir } => return self.opaque_marker(&dir),
            Target::Whiteout { parent, name } => {
                let pfd = self.parent(&parent)?;
                return self.whiteout(pfd.as_fd(), name, e);
            }
            Target::Path { parent, name } => (parent, name),
        };
        let mut comps = parent.clone();
        comps.push(name);
        let pfd = self.parent(&parent)?;
        let pfd = pfd.as_fd();

        let existing = lstat_at(pfd, name).map_err(|err| io_err(err, "stat"))?;
        if kind == Kind::HardLink {
            if let (Some(st), Some(t)) = (&existing, self.link_target_stat(e)) {
                if (st.st_dev, st.st_ino) == (t.st_dev, t.st_ino) {
                    // Already a name of the target (a link to itself, or the same link
                    // twice): nothing changes, as with GNU tar.
                    return self.mark(pfd, name).map_err(|err| io_err(err, "stat"));
                }
            }
        }
        // Whatever is at the path is replaced, unless both are directories.
        let keep_dir = kind == Kind::Dir && existing.as_ref().map(file_type) == Some(FileType::Directory);
        // In an upper dir, a directory that replaces this layer's own whiteout is opaque:
        // the lower directory is deleted, not merged.
        let over_whiteout = self.whiteouts == Whiteouts::Overlay
            && existing.as_ref().is_some_and(is_whiteout_dev)
            && self.is_ours(pfd, name).map_err(|err| io_err(err, "stat"))?;
        if existing.is_some() && !keep_dir {
            remove_all_at(pfd, name).map_err(|err| io_err(err, "removing what was at the path"))?;
        }

        let uid = id(e.uid, "uid")?;
        let gid = id(e.gid, "gid")?;
        let mode = Mode::from_raw_mode(e.mode & 0o7777);
        match kind {
            Kind::File => {
                let fd = openat(
                    pfd,
                    name,
                    OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::from_raw_mode(0o600),
                )
                .map_err(|err| io_err(err, "creating file"))?;
                let mut file = File::from(fd);
                self.copy_body(reader, &mut file, e.size)?;
                fchown(&file, Some(Uid::from_raw(uid)), Some(Gid::from_raw(gid)))
                    .map_err(|err| io_err(err, "chown"))?;
                self.xattrs(XattrTarget::Fd(file.as_fd()), e)?;
                // After chown, which clears the setuid and setgid bits.
                fchmod(&file, mode).map_err(|err| io_err(err, "chmod"))?;
                futimens(&file, &times(e)).map_err(|err| io_err(err, "setting times"))?;
                if !always_stored(e.mtime) {
                    check_stored(&fstat(&file).map_err(|err| io_err(err, "stat"))?, e.mtime)?;
                }
            }
            Kind::Dir => {
                if !keep_dir {
                    mkdirat(pfd, name, Mode::from_raw_mode(0o700)).map_err(|err| io_err(err, "creating directory"))?;
                }
                let fd = open_subdir(pfd, name).map_err(|err| io_err(err, "opening directory"))?;
                fchown(&fd, Some(Uid::from_raw(uid)), Some(Gid::from_raw(gid))).map_err(|err| io_err(err, "chown"))?;
                self.xattrs(XattrTarget::Fd(fd.as_fd()), e)?;
                fchmod(&fd, mode).map_err(|err| io_err(err, "chmod"))?;
                if over_whiteout {
                    self.make_opaque(fd.as_fd())
                        .map_err(|err| io_err(err, "making the directory opaque"))?;
                }
                // Times are set at the end: creating children changes them.
                self.dirs.push((join(&comps), e.mtime, e.mtime_nsec));
            }
            Kind::Symlink => {
                symlinkat(e.link.as_slice(), pfd, name).map_err(|err| io_err(err, "creating symlink"))?;
                self.finish_special(pfd, name, e, uid, gid, None)?;
            }
            Kind::HardLink => {
                // The inode keeps the metadata its first name was given, as GNU tar
                // does. (containerd chowns the new name, which clears setuid/setgid
                // bits of the shared inode and then fails to restore them.)
                self.hard_link(pfd, name, e)?;
            }
            Kind::CharDev | Kind::BlockDev | Kind::Fifo => {
                let (ft, dev) = match kind {
                    Kind::CharDev => (FileType::CharacterDevice, makedev(e.devmajor, e.devminor)),
                    Kind::BlockDev => (FileType::BlockDevice, makedev(e.devmajor, e.devminor)),
                    _ => (FileType::Fifo, 0),
                };
                mknodat(pfd, name, ft, Mode::from_raw_mode(0o600), dev).map_err(|err| io_err(err, "mknod"))?;
                self.finish_special(pfd, name, e, uid, gid, Some(mode))?;
            }
        }
        self.mark(pfd, name).map_err(|err| io_err(err, "stat"))?;
        Ok(())
    }

    /// Owner, xattrs, mode and times of something that is not opened (symlinks, hard
    /// links, devices, fifos), never following the last component.
    fn finish_special(
        &self,
        pfd: BorrowedFd<'_>,
        name: &[u8],
        e: &Entry,
        uid: u32,
        gid: u32,
        mode: Option<Mode>,
    ) -> Result<(), Error> {
        chownat(
            pfd,
            name,
            Some(Uid::from_raw(uid)),
            Some(Gid::from_raw(gid)),
            AtFlags::SYMLINK_NOFOLLOW,
        )
        .map_err(|err| io_err(err, "chown"))?;
        self.xattrs(XattrTarget::At(pfd, name), e)?;
        if let Some(mode) = mode {
            // The node was just created by mknodat in a directory we hold open; it is
            // not a symlink, so following is moot.
            chmodat(pfd, name, mode, AtFlags::empty()).map_err(|err| io_err(err, "chmod"))?;
        }
        utimensat(pfd, name, &times(e), AtFlags::SYMLINK_NOFOLLOW).map_err(|err| io_err(err, "setting times"))?;
        if !always_stored(e.mtime) {
            let st = statat(pfd, name, AtFlags::SYMLINK_NOFOLLOW).map_err(|err| io_err(err, "stat"))?;
            check_stored(&st, e.mtime)?;
        }
        Ok(())
    }

    fn hard_link(&mut self, pfd: BorrowedFd<'_>, name: &[u8], e: &Entry) -> Result<(), Error> {
        let target = name::components(&e.link).map_err(|err| {
            Error::new(
                ErrorKind::LinkTarget,
                format!("hard link target {:?}: {}", lossy(&e.link), err.message),
            )
        })?;
        let Some((&tname, tparent)) = target.split_last() else {
            return Err(Error::new(ErrorKind::LinkTarget, "hard link to the root directory"));
        };
        let bad = |why: String| {
            Error::new(
                ErrorKind::LinkTarget,
                format!("hard link target {:?}: {why}", lossy(&e.link)),
            )
        };
        let tfd = self.open_dir_in_root(&join(tparent)).map_err(|err| match err {
            Errno::NOENT | Errno::NOTDIR | Errno::LOOP => bad(format!("{}", std::io::Error::from(err))),
            _ => io_err(err, format!("resolving hard link target {:?}", lossy(&e.link))),
        })?;
        if self.whiteouts == Whiteouts::Overlay {
            // A whiteout stands for a deleted file: nothing to link to (the converter and
            // the OCI mode, where the file is gone, agree).
            let st = lstat_at(tfd.as_fd(), tname).map_err(|err| io_err(err, "stat of the hard link target"))?;
            if st.as_ref().is_some_and(is_whiteout_dev) {
                return Err(bad("it is deleted by a whiteout".into()));
            }
        }
        linkat(tfd.as_fd(), tname, pfd, name, AtFlags::empty()).map_err(|err| match err {
            Errno::NOENT | Errno::PERM | Errno::XDEV | Errno::ISDIR | Errno::MLINK => {
                bad(format!("{}", std::io::Error::from(err)))
            }
            _ => io_err(err, format!("linking to {:?}", lossy(&e.link))),
        })
    }

    fn copy_body<R: BufRead>(&mut self, reader: &mut TarReader<R>, file: &mut File, size: u64) -> Result<(), Error> {
        if self.buf.capacity() < COPY_BUF {
            self.buf = Vec::with_capacity(COPY_BUF);
        }
        self.buf.clear();
        let mut left = size;
        let src = reader.body();
        while left > 0 {
            let avail = src.fill_buf().map_err(|err| {
                let mut e = Error::io(err);
                e.message = format!("reading file data: {}", e.message);
                e
            })?;
            if avail.is_empty() {
                return Err(Error::new(ErrorKind::Truncated, "stream ended inside a file's data"));
            }
            let n = avail.len().min(usize::try_from(left).unwrap_or(usize::MAX));
            let chunk = &avail[..n];
            let write_err = |err: std::io::Error| {
                let mut e = Error::io(err);
                e.message = format!("writing file data: {}", e.message);
                e
            };
            if self.buf.is_empty() && n >= DIRECT_WRITE {
                file.write_all(chunk).map_err(write_err)?;
                src.consume(n);
            } else {
                let k = n.min(COPY_BUF - self.buf.len());
                self.buf.extend_from_slice(&chunk[..k]);
                src.consume(k);
                if self.buf.len() == COPY_BUF {
                    file.write_all(&self.buf).map_err(write_err)?;
                    self.buf.clear();
                }
                left -= k as u64;
                continue;
            }
            left -= n as u64;
        }
        if !self.buf.is_empty() {
            file.write_all(&self.buf).map_err(|err| {
                let mut e = Error::io(err);
                e.message = format!("writing file data: {}", e.message);
                e
            })?;
            self.buf.clear();
        }
        reader.body_done();
        self.stats.bytes += size;
        Ok(())
    }

    fn xattrs(&self, target: XattrTarget<'_>, e: &Entry) -> Result<(), Error> {
        for (k, v) in &e.xattrs {
            if self.whiteouts == Whiteouts::Overlay && oci_layer::xattr::is_overlay(k) {
                // Only whiteouts may produce overlay xattrs in an upper dir.
                continue;
            }
            let r = match target {
                XattrTarget::Fd(fd) => fsetxattr(fd, k.as_slice(), v, XattrFlags::empty()),
                XattrTarget::At(dir, name) => lsetxattr(proc_path(dir, name), k.as_slice(), v, XattrFlags::empty()),
            };
            match r {
                Ok(()) => {}
                // As containerd: a file system without xattrs, or security.* refused.
                Err(Errno::NOTSUP) => {}
                Err(Errno::PERM) if k.starts_with(b"security.") => {}
                Err(err) => return Err(io_err(err, format!("setting xattr {:?}", lossy(k)))),
            }
        }
        Ok(())
    }

    /// The layer root's own entry (`./`): a directory entry gives the root its owner,
    /// mode, xattrs and times, as GNU tar does for the directory it extracts into.
    fn root_entry(&mut self, e: &Entry, kind: Kind) -> Result<(), Error> {
        if kind != Kind::Dir {
            return Err(Error::new(
                ErrorKind::NotADirectory,
                "the layer root must be a directory",
            ));
        }
        let fd = self
            .open_in_root(b"", OFlags::RDONLY | OFlags::DIRECTORY)
            .map_err(|err| io_err(err, "opening the target directory"))?;
        fchown(
            &fd,
            Some(Uid::from_raw(id(e.uid, "uid")?)),
            Some(Gid::from_raw(id(e.gid, "gid")?)),
        )
        .map_err(|err| io_err(err, "chown"))?;
        self.xattrs(XattrTarget::Fd(fd.as_fd()), e)?;
        fchmod(&fd, Mode::from_raw_mode(e.mode & 0o7777)).map_err(|err| io_err(err, "chmod"))?;
        self.dirs.push((Vec::new(), e.mtime, e.mtime_nsec));
        Ok(())
    }

    /// `DIR/.wh..wh..opq`: the directory hides what the lower layers hold in it.
    fn opaque_marker(&mut self, dir: &[&[u8]]) -> Result<(), Error> {
        let pfd = self.parent(dir)?;
        let d = open_subdir(pfd.as_fd(), b".").map_err(|err| io_err(err, "opening the opaque directory"))?;
        match self.whiteouts {
            Whiteouts::Oci => self
                .clear_opaque(d.as_fd())
                .map(|_| ())
                .map_err(|err| io_err(err, "clearing the opaque directory")),
            Whiteouts::Overlay => self
                .make_opaque(d.as_fd())
                .map_err(|err| io_err(err, "making the directory opaque")),
        }
    }

    /// `.wh.NAME` in `pfd`: NAME of the lower layers is deleted. What this layer itself
    /// put at NAME stays (OCI image spec: a whiteout hides lower layers' content only),
    /// whichever comes first in the tar; a directory of this layer loses what the lower
    /// layers held in it (OCI mode) or becomes opaque (Overlay mode).
    fn whiteout(&mut self, pfd: BorrowedFd<'_>, name: &[u8], e: &Entry) -> Result<(), Error> {
        if self.whiteouts == Whiteouts::Overlay {
            let st = fstat(pfd).map_err(|err| io_err(err, "stat"))?;
            if self.opaque.contains(&(st.st_dev, st.st_ino)) {
                // Nothing below an opaque dir needs hiding, and overlayfs would list the
                // whiteout as a broken entry there.
                return Ok(());
            }
        }
        let existing = lstat_at(pfd, name).map_err(|err| io_err(err, "stat"))?;
        if let Some(st) = &existing {
            let ours = self.is_ours(pfd, name).map_err(|err| io_err(err, "stat"))?;
            if file_type(st) == FileType::Directory {
                // A directory that holds something of this layer stays, with that
                // content only (the lower content is hidden).
                let d = open_subdir(pfd, name).map_err(|err| io_err(err, "opening the directory"))?;
                let keep = match self.whiteouts {
                    Whiteouts::Oci => self.clear_opaque(d.as_fd()).map(|kept| kept || ours),
                    Whiteouts::Overlay if ours => self.make_opaque(d.as_fd()).map(|()| true),
                    Whiteouts::Overlay => Ok(false),
                }
                .map_err(|err| io_err(err, format!("hiding the lower {:?}", lossy(name))))?;
                if keep {
                    return Ok(());
                }
            } else if ours {
                return Ok(());
            }
        }
        match self.whiteouts {
            Whiteouts::Oci => {
                remove_all_at(pfd, name).map_err(|err| io_err(err, format!("deleting {:?}", lossy(name))))
            }
            Whiteouts::Overlay => {
                remove_all_at(pfd, name).map_err(|err| io_err(err, format!("replacing {:?}", lossy(name))))?;
                mknodat(pfd, name, FileType::CharacterDevice, Mode::empty(), makedev(0, 0))
                    .map_err(|err| io_err(err, "creating the whiteout device"))?;
                chownat(
                    pfd,
                    name,
                    Some(Uid::from_raw(id(e.uid, "uid")?)),
                    Some(Gid::from_raw(id(e.gid, "gid")?)),
                    AtFlags::SYMLINK_NOFOLLOW,
                )
                .map_err(|err| io_err(err, "chown of the whiteout device"))?;
                self.mark(pfd, name).map_err(|err| io_err(err, "stat"))
            }
        }
    }

    /// Sets `trusted.overlay.opaque=y` on the directory `dir` and removes the whiteout
    /// devices in it (an opaque dir is shown unmerged; see [`Applier::whiteout`]).
    fn make_opaque(&mut self, dir: BorrowedFd<'_>) -> Result<(), Errno> {
        fsetxattr(dir, oci_layer::xattr::OVERLAY_OPAQUE, b"y", XattrFlags::empty())?;
        let st = fstat(dir)?;
        self.opaque.insert((st.st_dev, st.st_ino));
        for (child, ft) in list_dir(dir)? {
            if matches!(ft, FileType::CharacterDevice | FileType::Unknown)
                && lstat_at(dir, &child)?.as_ref().is_some_and(is_whiteout_dev)
            {
                unlinkat(dir, child.as_slice(), AtFlags::empty())?;
            }
        }
        Ok(())
    }

    /// Whether this layer created or replaced `name` in `dir`.
    fn is_ours(&self, dir: BorrowedFd<'_>, name: &[u8]) -> Result<bool, Errno> {
        let st = fstat(dir)?;
        Ok(self.ours.contains(&(st.st_dev, st.st_ino, name.to_vec())))
    }

    /// The stat of what a hard link entry names, when it can be found.
    fn link_target_stat(&self, e: &Entry) -> Option<Stat> {
        let target = name::components(&e.link).ok()?;
        let (&tname, tparent) = target.split_last()?;
        let tfd = self.open_dir_in_root(&join(tparent)).ok()?;
        lstat_at(tfd.as_fd(), tname).ok().flatten()
    }

    /// Deletes from `dir` everything this layer did not create, descending into the
    /// directories it did create or merge (their older contents are hidden as well),
    /// and into older directories that hold something of this layer (an entry below a
    /// directory the layer only implies): those stay, with this layer's content only,
    /// as they do in the converted image. Returns whether anything was kept.
    fn clear_opaque(&self, dir: BorrowedFd<'_>) -> Result<bool, Errno> {
        let st = fstat(dir)?;
        let mut kept = false;
        for (name, ft) in list_dir(dir)? {
            let key = (st.st_dev, st.st_ino, name);
            let ours = self.ours.contains(&key);
            let is_dir = match ft {
                FileType::Directory => true,
                FileType::Unknown => lstat_at(dir, &key.2)?.is_some_and(|s| file_type(&s) == FileType::Directory),
                _ => false,
            };
            if is_dir {
                let sub = open_subdir(dir, &key.2)?;
                let holds_ours = self.clear_opaque(sub.as_fd())?;
                drop(sub);
                if ours || holds_ours {
                    kept = true;
                } else {
                    remove_all_at(dir, &key.2)?;
                }
            } else if ours {
                kept = true;
            } else {
                remove_all_at(dir, &key.2)?;
            }
        }
        Ok(kept)
    }

    /// Sets directory times, deepest first.
    fn finish_dirs(&mut self) -> Result<(), Error> {
        let mut dirs = std::mem::take(&mut self.dirs);
        // Deepest first, the root (empty path) last.
        dirs.sort_by_key(|(p, _, _)| {
            std::cmp::Reverse(if p.is_empty() {
                0
            } else {
                1 + p.iter().filter(|&&b| b == b'/').count()
            })
        });
        for (path, mtime, nsec) in dirs {
            let fd = match self.open_in_root(&path, OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW) {
                Ok(fd) => fd,
                // Deleted or replaced later in the layer.
                Err(Errno::NOENT | Errno::NOTDIR | Errno::LOOP) => continue,
                Err(err) => return Err(io_err(err, "opening directory").entry(&lossy(&path))),
            };
            let ts = rustix::fs::Timespec {
                tv_sec: mtime,
                tv_nsec: nsec.min(999_999_999) as _,
            };
            futimens(
                &fd,
                &Timestamps {
                    last_access: ts,
                    last_modification: ts,
                },
            )
            .map_err(|err| io_err(err, "setting directory times").entry(&lossy(&path)))?;
            if !always_stored(mtime) {
                let st = fstat(&fd).map_err(|err| io_err(err, "stat").entry(&lossy(&path)))?;
                check_stored(&st, mtime).map_err(|err| err.entry(&lossy(&path)))?;
            }
        }
        Ok(())
    }
}

/// Whether every Linux file system stores `secs` as it is (signed 32-bit seconds:
/// 1901-12-13 to 2038-01-19); later and earlier times depend on the file system (ext4
/// with large inodes: 1901 to 2446, XFS with bigtime: 1901 to 2486, tmpfs: all).
fn always_stored(secs: i64) -> bool {
    i32::try_from(secs).is_ok()
}

/// Refuses a time the target file system silently clamped: the layer cannot be
/// represented there, and a quiet change of its content is worse than an error.
fn check_stored(st: &Stat, secs: i64) -> Result<(), Error> {
    if st.st_mtime == secs {
        Ok(())
    } else {
        Err(Error::new(
            ErrorKind::Unsupported,
            format!(
                "the target file system cannot store the mtime {secs} (it stored {})",
                st.st_mtime
            ),
        ))
    }
}

/// Whether `st` is an overlayfs whiteout: a character device 0/0.
fn is_whiteout_dev(st: &Stat) -> bool {
    file_type(st) == FileType::CharacterDevice && st.st_rdev == 0
}

fn not_a_dir(path: &[u8]) -> Error {
    Error::new(
        ErrorKind::NotADirectory,
        format!("{:?} is not a directory", lossy(path)),
    )
}
