//! The fanotify data path: lazy blobs served with no FUSE in the read path.
//!
//! Each lazy blob is a sparse cache file of its full size, marked for `FAN_PRE_ACCESS` (Linux 6.14+). The
//! snapshotter mounts EROFS straight on that file. Every read the kernel makes of it raises a pre-content event
//! with its byte range; the daemon makes the chunks under the range present (fetched and verified) and only then
//! answers `FAN_ALLOW`, or denies the read with EIO after the read deadline. Once a blob is complete and verified
//! its mark is removed, and reads cost what a local layer's reads cost.
//!
//! What this kernel does (docs/fanotify.md) shapes the rest:
//! - The daemon's own reads and writes of a marked file raise events too: they are allowed at once (the event
//!   carries the pid), from the one thread that reads events and never waits for a fetch.
//! - If the last holder of the group closes it, every pending event is allowed and holes read as zeros. So the
//!   group lives in a small holder process ([`spawn_holder`]) that survives the daemon; a restarted daemon takes
//!   the same group from it ([`take_from_holder`]), with its marks and the events that queued meanwhile.
//! - The kernel matches a response to its event by descriptor number alone. Events read by a daemon that died
//!   before answering are answered by the next one from the [`Journal`] of numbers in flight.
//!
//! The syscalls are made here by hand: no maintained crate wraps pre-content events yet.

use std::fs::{File, OpenOptions};
use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::Duration;

use tracing::{debug, info, warn};

/// `FAN_PRE_ACCESS` (uapi/linux/fanotify.h, Linux 6.14): a pre-content event before a file range is accessed.
pub const FAN_PRE_ACCESS: u64 = 0x0010_0000;
const FAN_EVENT_INFO_TYPE_RANGE: u8 = 6;
const FAN_ALLOW: u32 = 0x01;
const FAN_DENY: u32 = 0x02;
const FAN_ERRNO_SHIFT: u32 = 24;
const METADATA_LEN: usize = std::mem::size_of::<libc::fanotify_event_metadata>();
const _: () = assert!(METADATA_LEN == 24);

/// One pre-content event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Event {
    /// The descriptor the kernel opened on the file for this event: the response names it.
    pub fd: RawFd,
    /// The process (thread group) whose access raised it.
    pub pid: i32,
    /// The event mask.
    pub mask: u64,
    /// The byte range `(offset, count)` accessed, when the event carries one.
    pub range: Option<(u64, u64)>,
}

/// A fanotify group of class `FAN_CLASS_PRE_CONTENT`.
pub struct Group {
    fd: OwnedFd,
}

impl Group {
    /// A new group. `EINVAL` means the kernel has no pre-content class (before 6.14 or not built in).
    pub fn new() -> io::Result<Group> {
        let flags = libc::FAN_CLASS_PRE_CONTENT
            | libc::FAN_CLOEXEC
            | libc::FAN_NONBLOCK
            | libc::FAN_UNLIMITED_QUEUE
            | libc::FAN_UNLIMITED_MARKS;
        let event_flags = (libc::O_RDONLY | libc::O_LARGEFILE | libc::O_CLOEXEC) as libc::c_uint;
        // SAFETY: plain syscall with integer arguments.
        let fd = unsafe { libc::fanotify_init(flags, event_flags) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fanotify_init returned a new descriptor we own.
        Ok(Group {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    /// A group whose descriptor came from elsewhere (the holder).
    pub fn from_fd(fd: OwnedFd) -> Group {
        Group { fd }
    }

    fn mark_op(&self, file: BorrowedFd<'_>, flags: libc::c_uint) -> io::Result<()> {
        // SAFETY: a null path with a descriptor as dirfd marks that descriptor's inode.
        let r = unsafe {
            libc::fanotify_mark(
                self.fd.as_raw_fd(),
                flags,
                FAN_PRE_ACCESS,
                file.as_raw_fd(),
                std::ptr::null(),
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Marks the file's inode for pre-content events. A file opened before it is marked never raises them
    /// (the kernel decides at open), so a cache file is marked before its path is handed out.
    pub fn mark(&self, file: BorrowedFd<'_>) -> io::Result<()> {
        self.mark_op(file, libc::FAN_MARK_ADD)
    }

    /// Removes the mark; a file that has none is not an error.
    pub fn unmark(&self, file: BorrowedFd<'_>) -> io::Result<()> {
        match self.mark_op(file, libc::FAN_MARK_REMOVE) {
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
            r => r,
        }
    }

    /// Waits up to `timeout` for events and returns those read (none on timeout).
    pub fn read_events(&self, buf: &mut [u8], timeout: Duration) -> io::Result<Vec<Event>> {
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let r = unsafe { libc::poll(&mut pfd, 1, timeout.as_millis().min(i32::MAX as u128) as i32) };
        if r < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted {
                Ok(Vec::new())
            } else {
                Err(e)
            };
        }
        if r == 0 {
            return Ok(Vec::new());
        }
        // SAFETY: buf is valid for writes of its length.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(Vec::new()),
                _ => Err(e),
            };
        }
        Ok(parse_events(&buf[..n as usize]))
    }

    /// Answers the event whose descriptor number is `fd`. `Ok(false)`: no such event is pending (answered
    /// already, or the number names none).
    pub fn respond(&self, fd: RawFd, allow: bool) -> io::Result<bool> {
        let deny_eio = FAN_DENY | ((libc::EIO as u32) << FAN_ERRNO_SHIFT);
        let mut r = self.write_response(fd, if allow { FAN_ALLOW } else { deny_eio });
        if !allow && matches!(&r, Err(e) if e.raw_os_error() == Some(libc::EINVAL)) {
            // A kernel without custom errors in responses: the read fails with EPERM instead of EIO.
            r = self.write_response(fd, FAN_DENY);
        }
        match r {
            Ok(()) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn write_response(&self, fd: RawFd, response: u32) -> io::Result<()> {
        let resp = libc::fanotify_response { fd, response };
        // SAFETY: writes the plain struct's bytes.
        let n = unsafe {
            libc::write(
                self.fd.as_raw_fd(),
                (&resp as *const libc::fanotify_response).cast(),
                std::mem::size_of::<libc::fanotify_response>(),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// The group's descriptor.
    pub fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// Parses a buffer of fanotify events; a malformed tail is dropped.
fn parse_events(buf: &[u8]) -> Vec<Event> {
    let u16_at = |o: usize| u16::from_ne_bytes([buf[o], buf[o + 1]]);
    let u32_at = |o: usize| u32::from_ne_bytes(buf[o..o + 4].try_into().unwrap());
    let u64_at = |o: usize| u64::from_ne_bytes(buf[o..o + 8].try_into().unwrap());
    let mut out = Vec::new();
    let mut off = 0;
    while off + METADATA_LEN <= buf.len() {
        let event_len = u32_at(off) as usize;
        let metadata_len = u16_at(off + 6) as usize;
        if event_len < METADATA_LEN || off + event_len > buf.len() || metadata_len < METADATA_LEN {
            break;
        }
        let mask = u64_at(off + 8);
        let fd = u32_at(off + 16) as i32;
        let pid = u32_at(off + 20) as i32;
        let mut range = None;
        let mut i = off + metadata_len;
        while i + 4 <= off + event_len {
            let (kind, len) = (buf[i], u16_at(i + 2) as usize);
            if len < 4 || i + len > off + event_len {
                break;
            }
            if kind == FAN_EVENT_INFO_TYPE_RANGE && len >= 24 {
                range = Some((u64_at(i + 8), u64_at(i + 16)));
            }
            i += len;
        }
        out.push(Event { fd, pid, mask, range });
        off += event_len;
    }
    out
}

/// Whether this kernel has pre-content events for regular files: a group is made and a scratch file in `dir`
/// marked. `Err` says why not.
pub fn probe(dir: &Path) -> Result<(), String> {
    let group = Group::new().map_err(|e| format!("fanotify_init(FAN_CLASS_PRE_CONTENT): {e}"))?;
    let file = tempfile::tempfile_in(dir).map_err(|e| format!("scratch file in {}: {e}", dir.display()))?;
    group
        .mark(file.as_fd())
        .map_err(|e| format!("fanotify_mark(FAN_PRE_ACCESS): {e}"))
}

// ---- the holder ----

/// The argument that makes `dedupd` the group's holder (see [`holder_main`]).
pub const HOLDER_ARG: &str = "--fanotify-group-holder";
/// The group's descriptor number in the holder.
const HOLDER_GROUP_FD: RawFd = 3;

/// Asks a holder at `socket` for its group. `None` when no holder answers.
pub fn take_from_holder(socket: &Path) -> io::Result<Option<(Group, u64)>> {
    let Ok(stream) = UnixStream::connect(socket) else {
        return Ok(None);
    };
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    rustix::io::write(&stream, b"G")?;
    let mut id = [0u8; 8];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = rustix::net::RecvAncillaryBuffer::new(&mut space);
    let msg = rustix::net::recvmsg(
        &stream,
        &mut [IoSliceMut::new(&mut id)],
        &mut control,
        rustix::net::RecvFlags::CMSG_CLOEXEC,
    )?;
    let mut fd = None;
    for m in control.drain() {
        if let rustix::net::RecvAncillaryMessage::ScmRights(mut fds) = m {
            fd = fds.next();
        }
    }
    match (msg.bytes, fd) {
        (8, Some(fd)) => Ok(Some((Group::from_fd(fd), u64::from_ne_bytes(id)))),
        _ => Err(io::Error::other("the fanotify group holder sent no group")),
    }
}

/// Starts the holder: this executable again, with the group as descriptor 3, in its own session so that a kill
/// of the daemon (or of its process group) leaves it. It serves the group on `socket` and exits when told to
/// ([`release_holder`]) or when `socket` is gone (its directory deleted).
pub fn spawn_holder(group: &Group, socket: &Path, instance: u64) -> io::Result<()> {
    use std::os::unix::process::CommandExt;
    let exe = std::env::current_exe()?;
    let raw = group.fd.as_raw_fd();
    let mut cmd = std::process::Command::new(exe);
    cmd.arg(HOLDER_ARG)
        .arg(socket)
        .arg(instance.to_string())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            // dup2 onto itself keeps close-on-exec: the flag is cleared by hand then.
            let r = if raw == HOLDER_GROUP_FD {
                libc::fcntl(raw, libc::F_SETFD, 0)
            } else {
                libc::dup2(raw, HOLDER_GROUP_FD)
            };
            if r < 0 {
                return Err(io::Error::last_os_error());
            }
            libc::setsid();
            Ok(())
        });
    }
    let _ = std::fs::remove_file(socket);
    let mut child = cmd.spawn()?;
    // Ready once it listens: the next daemon must find it.
    for _ in 0..200 {
        if UnixStream::connect(socket).is_ok_and(|s| rustix::io::write(&s, b"P").is_ok()) {
            // Reaped by a thread: the holder outlives us normally, but a failed start must not leave a zombie.
            std::thread::spawn(move || child.wait());
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            return Err(io::Error::other(format!("the fanotify group holder exited: {status}")));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    Err(io::Error::other("the fanotify group holder did not start listening"))
}

/// Tells the holder at `socket` to exit (the group goes with it: only when nothing is marked).
pub fn release_holder(socket: &Path) {
    if let Ok(s) = UnixStream::connect(socket) {
        let _ = rustix::io::write(&s, b"R");
    }
}

/// The holder's main: keeps descriptor 3 (the group) open and hands it to whoever asks on `socket` as root.
pub fn holder_main(socket: &Path, instance: u64) -> ! {
    // A holder without its group would hand out whatever descriptor 3 is.
    let is_group = std::fs::read_link(format!("/proc/self/fd/{HOLDER_GROUP_FD}"))
        .is_ok_and(|l| l.to_string_lossy().contains("fanotify"));
    if !is_group {
        std::process::exit(2);
    }
    // SAFETY: descriptor 3 was set up by spawn_holder and is ours.
    let group = unsafe { OwnedFd::from_raw_fd(HOLDER_GROUP_FD) };
    let _ = std::fs::remove_file(socket);
    let listener = match UnixListener::bind(socket) {
        Ok(l) => l,
        Err(_) => std::process::exit(1),
    };
    let ino = std::fs::metadata(socket)
        .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
        .unwrap_or(0);
    let watched = socket.to_path_buf();
    std::thread::spawn(move || loop {
        std::thread::sleep(Duration::from_secs(2));
        let now = std::fs::metadata(&watched).map(|m| std::os::unix::fs::MetadataExt::ino(&m));
        if now.ok() != Some(ino) {
            std::process::exit(0);
        }
    });
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let trusted = rustix::net::sockopt::socket_peercred(&stream)
            .is_ok_and(|c| c.uid.is_root() || c.uid == rustix::process::getuid());
        if !trusted {
            continue;
        }
        let mut op = [0u8; 1];
        if rustix::io::read(&stream, &mut op).unwrap_or(0) != 1 {
            continue;
        }
        match op[0] {
            b'G' => {
                let id = instance.to_ne_bytes();
                let fds = [group.as_fd()];
                let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
                let mut control = rustix::net::SendAncillaryBuffer::new(&mut space);
                control.push(rustix::net::SendAncillaryMessage::ScmRights(&fds));
                let _ = rustix::net::sendmsg(
                    &stream,
                    &[IoSlice::new(&id)],
                    &mut control,
                    rustix::net::SendFlags::empty(),
                );
            }
            b'R' => {
                let _ = std::fs::remove_file(socket);
                std::process::exit(0);
            }
            _ => {}
        }
    }
    std::process::exit(0)
}

// ---- the journal of events in flight ----

const SLOT: u64 = 64;
const SLOT_MAGIC: u32 = 0x444a_4631; // "1FJD"

/// Events read and not yet answered, one 64-byte slot per descriptor number: `magic, fd, offset, count, sha256`.
/// Written before an event is handled and cleared after its answer, so that a daemon killed in between leaves
/// what the next one needs to answer it. Not synced: it must survive the process, not the machine (a reboot
/// takes the waiting readers with it).
pub struct Journal {
    file: File,
}

/// An event found in the journal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Journaled {
    /// The event's descriptor number.
    pub fd: RawFd,
    /// The blob's digest hex.
    pub hex: String,
    /// The range accessed.
    pub offset: u64,
    /// Its length.
    pub count: u64,
}

impl Journal {
    /// Opens (creating) the journal at `path`.
    pub fn open(path: &Path) -> io::Result<Journal> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        Ok(Journal { file })
    }

    /// Forgets everything (a new group: nothing recorded can be pending in it).
    pub fn clear_all(&self) -> io::Result<()> {
        self.file.set_len(0)
    }

    /// Records an event before it is handled.
    pub fn record(&self, fd: RawFd, hex: &str, offset: u64, count: u64) {
        let Ok(raw) = hex::decode(hex) else { return };
        let mut slot = [0u8; SLOT as usize];
        slot[0..4].copy_from_slice(&SLOT_MAGIC.to_le_bytes());
        slot[4..8].copy_from_slice(&fd.to_le_bytes());
        slot[8..16].copy_from_slice(&offset.to_le_bytes());
        slot[16..24].copy_from_slice(&count.to_le_bytes());
        slot[24..56].copy_from_slice(&raw);
        if let Err(e) = self.file.write_all_at(&slot, fd as u64 * SLOT) {
            warn!(error = %e, "cannot journal a fanotify event");
        }
    }

    /// Clears an event's slot once it is answered.
    pub fn clear(&self, fd: RawFd) {
        let _ = self.file.write_all_at(&[0u8; 4], fd as u64 * SLOT);
    }

    /// The events recorded and not cleared.
    pub fn entries(&self) -> io::Result<Vec<Journaled>> {
        let len = self.file.metadata()?.len();
        let mut buf = vec![0u8; len as usize];
        self.file.read_exact_at(&mut buf, 0)?;
        let mut out = Vec::new();
        for (n, slot) in buf.chunks_exact(SLOT as usize).enumerate() {
            if u32::from_le_bytes(slot[0..4].try_into().unwrap()) != SLOT_MAGIC {
                continue;
            }
            let fd = i32::from_le_bytes(slot[4..8].try_into().unwrap());
            if fd as usize != n {
                continue;
            }
            out.push(Journaled {
                fd,
                offset: u64::from_le_bytes(slot[8..16].try_into().unwrap()),
                count: u64::from_le_bytes(slot[16..24].try_into().unwrap()),
                hex: hex::encode(&slot[24..56]),
            });
        }
        Ok(out)
    }
}

/// Keeps descriptor number `fd` from being given to a new event while an old event of that number waits for
/// its answer: `None` when the number is in use here already (it cannot be reused while it is).
pub fn reserve_number(fd: RawFd) -> Option<OwnedFd> {
    // SAFETY: F_GETFD only queries.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } >= 0 {
        return None;
    }
    let null = File::open("/dev/null").ok()?;
    // SAFETY: dup2 onto a number that is free here.
    let r = unsafe { libc::dup2(null.as_raw_fd(), fd) };
    if r != fd {
        return None;
    }
    // SAFETY: we just made `fd` ours.
    Some(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Answers, denying, every event numbered below `limit` but those in `keep`: events the previous daemon read
/// but had not journaled when it died. Called before this daemon reads any event, so no event of its own can be
/// hit. Returns how many were pending.
pub fn deny_orphans(group: &Group, limit: RawFd, keep: &std::collections::HashSet<RawFd>) -> usize {
    let mut n = 0;
    for fd in 0..limit {
        if keep.contains(&fd) {
            continue;
        }
        if group.respond(fd, false).unwrap_or(false) {
            n += 1;
        }
    }
    if n > 0 {
        info!(
            events = n,
            "answered with EIO the reads a killed instance had taken and not journaled"
        );
    } else {
        debug!("no unjournaled event was pending");
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_parse_with_their_range() {
        let mut buf = Vec::new();
        let mut push = |fd: i32, pid: i32, range: Option<(u64, u64)>| {
            let len = 24 + if range.is_some() { 24 } else { 0 };
            buf.extend_from_slice(&(len as u32).to_ne_bytes());
            buf.extend_from_slice(&[3, 0]);
            buf.extend_from_slice(&24u16.to_ne_bytes());
            buf.extend_from_slice(&FAN_PRE_ACCESS.to_ne_bytes());
            buf.extend_from_slice(&fd.to_ne_bytes());
            buf.extend_from_slice(&pid.to_ne_bytes());
            if let Some((o, c)) = range {
                buf.extend_from_slice(&[FAN_EVENT_INFO_TYPE_RANGE, 0]);
                buf.extend_from_slice(&24u16.to_ne_bytes());
                buf.extend_from_slice(&[0; 4]);
                buf.extend_from_slice(&o.to_ne_bytes());
                buf.extend_from_slice(&c.to_ne_bytes());
            }
        };
        push(7, 100, Some((4096, 8192)));
        push(8, 101, None);
        let mut with_tail = buf.clone();
        with_tail.extend_from_slice(&[1, 2, 3]);
        let events = parse_events(&with_tail);
        assert_eq!(
            events,
            vec![
                Event {
                    fd: 7,
                    pid: 100,
                    mask: FAN_PRE_ACCESS,
                    range: Some((4096, 8192))
                },
                Event {
                    fd: 8,
                    pid: 101,
                    mask: FAN_PRE_ACCESS,
                    range: None
                },
            ]
        );
        // A length that runs past the buffer ends parsing instead of reading out of bounds.
        let mut bad = buf[..24].to_vec();
        bad[0..4].copy_from_slice(&1000u32.to_ne_bytes());
        assert!(parse_events(&bad).is_empty());
    }

    #[test]
    fn journal_keeps_what_is_not_cleared() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(&dir.path().join("j")).unwrap();
        let hex = "ab".repeat(32);
        j.record(5, &hex, 4096, 100);
        j.record(9, &hex, 0, 1);
        j.clear(5);
        let j = Journal::open(&dir.path().join("j")).unwrap();
        assert_eq!(
            j.entries().unwrap(),
            vec![Journaled {
                fd: 9,
                hex: hex.clone(),
                offset: 0,
                count: 1
            }]
        );
        j.clear_all().unwrap();
        assert!(j.entries().unwrap().is_empty());
    }
}
