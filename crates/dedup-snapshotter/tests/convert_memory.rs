//! Memory stays bounded by metadata, not file sizes: a layer holding one 5 GiB file
//! converts with a peak RSS under 100 MB, and the file reads back right through the
//! kernel.

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Command, Stdio};

const SIZE: u64 = 5 << 30;

/// A tar header for a regular file, ustar format, octal fields.
fn header(name: &str, size: u64) -> [u8; 512] {
    let mut h = [0u8; 512];
    h[..name.len()].copy_from_slice(name.as_bytes());
    let mut field = |off: usize, len: usize, v: u64| {
        let s = format!("{:0width$o}\0", v, width = len - 1);
        h[off..off + len].copy_from_slice(s.as_bytes());
    };
    field(100, 8, 0o644);
    field(108, 8, 0);
    field(116, 8, 0);
    field(124, 12, size);
    field(136, 12, 1_700_000_000);
    h[156] = b'0';
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    h
}

/// The byte at `offset` of the big file: a pattern that catches misplaced blocks.
fn pattern(offset: u64) -> u8 {
    let block = offset / 4096;
    (block as u8) ^ (offset as u8).wrapping_mul(31)
}

#[test]
// Reaped with wait4 below, which also gives the peak RSS std's `wait` does not.
#[allow(clippy::zombie_processes)]
fn five_gib_file_converts_in_bounded_memory() {
    assert!(
        unsafe { libc::geteuid() } == 0,
        "this test needs root (it mounts the image)"
    );
    // Unmounted (whatever happens below) and removed on drop.
    let dir = test_support::TestDir::new_in(Path::new("/var/tmp"), "dedup-mem");
    let image = dir.path().join("big.erofs");

    let mut child = Command::new(env!("CARGO_BIN_EXE_dedup-snapshotter"))
        .args(["convert", "--json", "-"])
        .arg(&image)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id() as libc::pid_t;
    let mut stdin = child.stdin.take().unwrap();
    let feeder = std::thread::spawn(move || {
        stdin.write_all(&header("big.bin", SIZE)).unwrap();
        let mut buf = vec![0u8; 1 << 20];
        let mut off = 0u64;
        while off < SIZE {
            for (i, b) in buf.iter_mut().enumerate() {
                *b = pattern(off + i as u64);
            }
            stdin.write_all(&buf).unwrap();
            off += buf.len() as u64;
        }
        stdin.write_all(&[0u8; 1024]).unwrap();
    });
    let mut stdout = child.stdout.take().unwrap();
    let mut out = String::new();
    stdout.read_to_string(&mut out).unwrap();
    feeder.join().unwrap();

    // wait4 gives the child's own peak RSS, which std's Child does not expose.
    let mut status = 0;
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    assert_eq!(r, pid);
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "convert failed: {out}"
    );
    let peak_kib = usage.ru_maxrss as u64;
    eprintln!("peak RSS converting a 5 GiB file: {} MiB", peak_kib / 1024);
    assert!(peak_kib < 100 * 1024, "peak RSS {peak_kib} KiB is not under 100 MB");

    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["uncompressed_size"], SIZE + 512 + 1024);
    assert_eq!(report["entries"], 1);

    // Read back through the kernel at block edges spread over the whole file.
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    rustix::mount::mount(&image, &mnt, "erofs", rustix::mount::MountFlags::RDONLY, None).unwrap();
    let mounted = test_support::Unmount(mnt.clone());
    let check = (|| -> Result<(), String> {
        let f = std::fs::File::open(mnt.join("big.bin")).map_err(|e| e.to_string())?;
        let len = f.metadata().map_err(|e| e.to_string())?.len();
        if len != SIZE {
            return Err(format!("size {len} != {SIZE}"));
        }
        for k in 0..64u64 {
            let off = (SIZE / 64) * k + (k * 4093) % 4096;
            let off = off.min(SIZE - 8192);
            let mut got = vec![0u8; 8192];
            f.read_exact_at(&mut got, off).map_err(|e| e.to_string())?;
            let want: Vec<u8> = (0..8192).map(|i| pattern(off + i)).collect();
            if got != want {
                return Err(format!("content differs at offset {off}"));
            }
        }
        let mut last = std::fs::File::open(mnt.join("big.bin")).map_err(|e| e.to_string())?;
        last.seek(SeekFrom::Start(SIZE - 1)).map_err(|e| e.to_string())?;
        let mut b = [0u8; 2];
        let n = last.read(&mut b).map_err(|e| e.to_string())?;
        if n != 1 || b[0] != pattern(SIZE - 1) {
            return Err("last byte wrong".into());
        }
        Ok(())
    })();
    drop(mounted);
    assert!(!test_support::is_mounted(&mnt));
    check.unwrap();
    assert!(Path::new(&image).metadata().unwrap().len() >= SIZE);
}
