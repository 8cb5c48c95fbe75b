//! The `inspect`, `ls` and `cat` subcommands: look inside an EROFS layer image without
//! mounting it (no privileges needed, works on images the kernel would reject).

use std::collections::HashSet;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use erofs::format::{self, SuperBlock};
use erofs::reader::{Entry, FileKind, Image};
use serde_json::{json, Value};

/// Prints a summary of the image's superblock and device table (as one JSON object with
/// `json`). `devices` are the image's extra devices, checked against the table when given.
pub fn inspect(image: &Path, devices: &[PathBuf], json: bool) -> anyhow::Result<()> {
    let img = open(image, devices)?;
    let sb = img.superblock();
    let file_size = std::fs::metadata(image)?.len();
    let features = feature_names(sb);
    let uuid = format_uuid(&sb.uuid);
    let volume = String::from_utf8_lossy(sb.volume_name.split(|&c| c == 0).next().unwrap_or(&[])).into_owned();
    let built = format_time(sb.build_time, sb.build_time_nsec);
    let slots = img.devices();
    if json {
        let table: Vec<Value> = slots
            .iter()
            .enumerate()
            .map(|(i, d)| {
                json!({
                    "id": i + 1,
                    "tag": device_tag(&d.tag),
                    "blocks": d.blocks,
                    "mapped_blkaddr": d.mapped_blkaddr,
                    "file": devices.get(i).map(|p| p.display().to_string()),
                })
            })
            .collect();
        let v = json!({
            "image": image.display().to_string(),
            "file_size": file_size,
            "block_size": img.block_size(),
            "blocks": sb.blocks,
            "inodes": sb.inos,
            "root_nid": sb.root_nid,
            "meta_blkaddr": sb.meta_blkaddr,
            "xattr_blkaddr": sb.xattr_blkaddr,
            "uuid": uuid,
            "volume_name": volume,
            "build_time": sb.build_time,
            "build_time_nsec": sb.build_time_nsec,
            "build_time_utc": built,
            "feature_compat": sb.feature_compat,
            "feature_incompat": sb.feature_incompat,
            "features": features,
            "extra_devices": sb.extra_devices,
            "devices": table,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let mut out = std::io::stdout().lock();
    let bs = img.block_size();
    writeln!(out, "image:          {}", image.display())?;
    writeln!(out, "file size:      {file_size} bytes")?;
    writeln!(out, "block size:     {bs}")?;
    writeln!(out, "blocks:         {} ({} bytes)", sb.blocks, sb.blocks as u64 * bs)?;
    writeln!(out, "inodes:         {}", sb.inos)?;
    writeln!(out, "root nid:       {}", sb.root_nid)?;
    writeln!(out, "meta blkaddr:   {}", sb.meta_blkaddr)?;
    writeln!(out, "xattr blkaddr:  {}", sb.xattr_blkaddr)?;
    writeln!(out, "uuid:           {uuid}")?;
    if !volume.is_empty() {
        writeln!(out, "volume name:    {volume}")?;
    }
    writeln!(out, "build time:     {built} ({})", sb.build_time)?;
    writeln!(out, "features:       {}", features.join(" "))?;
    if sb.extra_devices != 0 {
        writeln!(out, "extra devices:  {}", sb.extra_devices)?;
    }
    for (i, d) in slots.iter().enumerate() {
        write!(
            out,
            "device {}:       tag {:?} blocks {} mapped_blkaddr {}",
            i + 1,
            device_tag(&d.tag),
            d.blocks,
            d.mapped_blkaddr
        )?;
        if let Some(p) = devices.get(i) {
            write!(out, " file {}", p.display())?;
        }
        writeln!(out)?;
    }
    Ok(())
}

/// A device slot's tag: the bytes up to the first NUL (the rest is padding).
fn device_tag(tag: &[u8]) -> String {
    String::from_utf8_lossy(tag.split(|&c| c == 0).next().unwrap_or(&[])).into_owned()
}

/// Lists `path` (default `/`) like `ls -l`: a directory's entries, or the entry itself;
/// with `recursive`, the whole subtree with full paths. `json` prints one array.
/// `devices` are the image's extra devices (symlinks and directories may live there).
pub fn ls(image: &Path, devices: &[PathBuf], path: Option<&str>, recursive: bool, json: bool) -> anyhow::Result<()> {
    let img = open(image, devices)?;
    let start_path = normalize(path.unwrap_or("/"));
    let start = img
        .lookup(start_path.as_bytes())
        .with_context(|| format!("looking up {start_path} in {}", image.display()))?;

    // (full path, name to show in text mode, entry)
    let mut rows: Vec<(Vec<u8>, Vec<u8>, Entry)> = Vec::new();
    if start.kind != FileKind::Dir {
        // Like `ls -l FILE`, a single entry is shown by the path it was asked for.
        let p = start_path.as_bytes().to_vec();
        rows.push((p.clone(), p, start));
    } else {
        // Explicit stack and a visited set: a corrupt image must not recurse forever.
        let mut seen = HashSet::new();
        let mut stack = vec![(start_path.as_bytes().to_vec(), start)];
        while let Some((dir_path, dir)) = stack.pop() {
            if !seen.insert(dir.nid) {
                bail!("directory cycle at {}", String::from_utf8_lossy(&dir_path));
            }
            let mut subdirs = Vec::new();
            for d in img.read_dir(&dir)? {
                if d.name == b"." || d.name == b".." {
                    continue;
                }
                let e = img.entry(d.nid)?;
                let mut full = dir_path.clone();
                if full != b"/" {
                    full.push(b'/');
                }
                full.extend_from_slice(&d.name);
                if recursive && e.kind == FileKind::Dir {
                    subdirs.push((full.clone(), e.clone()));
                }
                let shown = if recursive { full.clone() } else { d.name };
                rows.push((full, shown, e));
            }
            // Reversed so the first subdirectory is listed next: depth-first, disk order.
            stack.extend(subdirs.into_iter().rev());
        }
    }

    let mut out = BufWriter::new(std::io::stdout().lock());
    if json {
        let mut arr = Vec::with_capacity(rows.len());
        for (full, _, e) in &rows {
            arr.push(json_row(&img, full, e)?);
        }
        serde_json::to_writer_pretty(&mut out, &Value::Array(arr))?;
        writeln!(out)?;
    } else {
        for (_, shown, e) in &rows {
            text_row(&img, &mut out, shown, e)?;
        }
    }
    out.flush()?;
    Ok(())
}

/// Streams a regular file's contents to stdout. Symlinks are not followed. `devices` are
/// the image's extra devices, where its data may be.
pub fn cat(image: &Path, devices: &[PathBuf], path: &str) -> anyhow::Result<()> {
    let img = open(image, devices)?;
    let e = img
        .lookup(path.as_bytes())
        .with_context(|| format!("looking up {path} in {}", image.display()))?;
    match e.kind {
        FileKind::File => {}
        FileKind::Symlink => {
            let target = img.read_link(&e)?;
            bail!(
                "{path} is a symlink to {:?}; cat does not follow symlinks, cat the target instead",
                String::from_utf8_lossy(&target)
            );
        }
        k => bail!("{path} is not a regular file (it is a {})", kind_name(k)),
    }
    let mut out = BufWriter::new(std::io::stdout().lock());
    let res = img.copy_to(&e, &mut out).map_err(anyhow::Error::from).and_then(|_| {
        out.flush()?;
        Ok(())
    });
    match res {
        // `cat ... | head` closing the pipe early is not a failure worth reporting.
        Err(err) if is_broken_pipe(&err) => Ok(()),
        r => r.with_context(|| format!("reading {path} from {}", image.display())),
    }
}

fn open(image: &Path, devices: &[PathBuf]) -> anyhow::Result<Image> {
    Image::open_with_devices(image, devices).with_context(|| format!("opening EROFS image {}", image.display()))
}

fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|c| {
        let io = c.downcast_ref::<std::io::Error>().or(match c.downcast_ref() {
            Some(erofs::reader::Error::Io(e)) => Some(e),
            _ => None,
        });
        io.is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// `/a/b` form of a user-given path, so JSON paths are absolute whatever was typed.
fn normalize(p: &str) -> String {
    let parts: Vec<&str> = p.split('/').filter(|c| !c.is_empty() && *c != ".").collect();
    format!("/{}", parts.join("/"))
}

fn text_row(img: &Image, out: &mut impl Write, name: &[u8], e: &Entry) -> anyhow::Result<()> {
    let ino = &e.inode;
    let size = match e.kind {
        FileKind::CharDev | FileKind::BlockDev => {
            let (ma, mi) = img.rdev(e);
            format!("{ma}, {mi}")
        }
        _ => ino.size.to_string(),
    };
    write!(
        out,
        "{} {:>3} {:>6} {:>6} {:>10} {} {}",
        perm_string(ino.mode),
        ino.nlink,
        ino.uid,
        ino.gid,
        size,
        format_time(ino.mtime, ino.mtime_nsec),
        String::from_utf8_lossy(name)
    )?;
    if e.kind == FileKind::Symlink {
        write!(out, " -> {}", String::from_utf8_lossy(&img.read_link(e)?))?;
    }
    writeln!(out)?;
    for (k, v) in img.xattrs(e)? {
        writeln!(out, "    {}={}", String::from_utf8_lossy(&k), xattr_value_text(&v))?;
    }
    Ok(())
}

fn json_row(img: &Image, path: &[u8], e: &Entry) -> anyhow::Result<Value> {
    let ino = &e.inode;
    let rdev = match e.kind {
        FileKind::CharDev | FileKind::BlockDev => {
            let (ma, mi) = img.rdev(e);
            json!([ma, mi])
        }
        _ => Value::Null,
    };
    let target = match e.kind {
        FileKind::Symlink => Value::String(String::from_utf8_lossy(&img.read_link(e)?).into()),
        _ => Value::Null,
    };
    let mut xattrs = serde_json::Map::new();
    for (k, v) in img.xattrs(e)? {
        xattrs.insert(String::from_utf8_lossy(&k).into_owned(), Value::String(hex::encode(v)));
    }
    Ok(json!({
        "path": String::from_utf8_lossy(path),
        "type": kind_name(e.kind),
        "mode": ino.mode & !format::mode::S_IFMT,
        "uid": ino.uid,
        "gid": ino.gid,
        "size": ino.size,
        "mtime": ino.mtime,
        "mtime_nsec": ino.mtime_nsec,
        "nlink": ino.nlink,
        "nid": e.nid,
        "rdev": rdev,
        "target": target,
        "xattrs": xattrs,
    }))
}

fn kind_name(k: FileKind) -> &'static str {
    match k {
        FileKind::File => "file",
        FileKind::Dir => "dir",
        FileKind::Symlink => "symlink",
        FileKind::CharDev => "char",
        FileKind::BlockDev => "block",
        FileKind::Fifo => "fifo",
        FileKind::Socket => "socket",
    }
}

/// `ls -l` style mode string, e.g. `drwxr-xr-x`, `-rwsr-xr-x`, `drwxrwxrwt`.
fn perm_string(mode: u16) -> String {
    let kind = match FileKind::from_mode(mode) {
        Some(FileKind::File) => '-',
        Some(FileKind::Dir) => 'd',
        Some(FileKind::Symlink) => 'l',
        Some(FileKind::CharDev) => 'c',
        Some(FileKind::BlockDev) => 'b',
        Some(FileKind::Fifo) => 'p',
        Some(FileKind::Socket) => 's',
        None => '?',
    };
    let bit = |m: u16, c: char| if mode & m != 0 { c } else { '-' };
    // The execute slot doubles as the special bit: lowercase when also executable.
    let special = |x: u16, s: u16, lower: char, upper: char| match (mode & x != 0, mode & s != 0) {
        (true, true) => lower,
        (false, true) => upper,
        (true, false) => 'x',
        (false, false) => '-',
    };
    [
        kind,
        bit(0o400, 'r'),
        bit(0o200, 'w'),
        special(0o100, 0o4000, 's', 'S'),
        bit(0o040, 'r'),
        bit(0o020, 'w'),
        special(0o010, 0o2000, 's', 'S'),
        bit(0o004, 'r'),
        bit(0o002, 'w'),
        special(0o001, 0o1000, 't', 'T'),
    ]
    .iter()
    .collect()
}

/// Printable ASCII as-is, anything else (including NUL terminators) as `0x` hex so the
/// output stays one line per xattr and unambiguous.
fn xattr_value_text(v: &[u8]) -> String {
    if v.iter().all(|&c| (0x20..0x7f).contains(&c)) {
        String::from_utf8_lossy(v).into_owned()
    } else {
        format!("0x{}", hex::encode(v))
    }
}

/// Canonical 8-4-4-4-12 lowercase hex.
fn format_uuid(u: &[u8; 16]) -> String {
    let h = hex::encode(u);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// Names of the feature bits set, with any unknown bits in hex.
fn feature_names(sb: &SuperBlock) -> Vec<String> {
    const COMPAT: &[(u32, &str)] = &[
        (format::FEATURE_COMPAT_SB_CHKSUM, "sb_csum"),
        (format::FEATURE_COMPAT_MTIME, "mtime"),
    ];
    const INCOMPAT: &[(u32, &str)] = &[
        (format::FEATURE_INCOMPAT_ZERO_PADDING, "zero_padding"),
        (format::FEATURE_INCOMPAT_COMPR_CFGS, "compr_cfgs"),
        (format::FEATURE_INCOMPAT_CHUNKED_FILE, "chunked_file"),
        (format::FEATURE_INCOMPAT_DEVICE_TABLE, "device_table"),
        (format::FEATURE_INCOMPAT_ZTAILPACKING, "ztailpacking"),
        (format::FEATURE_INCOMPAT_FRAGMENTS, "fragments"),
        (format::FEATURE_INCOMPAT_XATTR_PREFIXES, "xattr_prefixes"),
        (format::FEATURE_INCOMPAT_48BIT, "48bit"),
        (format::FEATURE_INCOMPAT_METABOX, "metabox"),
    ];
    let mut names = Vec::new();
    for (bits, table, kind) in [
        (sb.feature_compat, COMPAT, "compat"),
        (sb.feature_incompat, INCOMPAT, "incompat"),
    ] {
        let mut rest = bits;
        for (bit, name) in table {
            if bits & bit != 0 {
                names.push((*name).to_string());
                rest &= !bit;
            }
        }
        if rest != 0 {
            names.push(format!("{kind}:{rest:#x}"));
        }
    }
    names
}

/// UTC `YYYY-MM-DDTHH:MM:SS.nnnnnnnnnZ` without a date library.
fn format_time(secs: u64, nsec: u32) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{nsec:09}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian
/// (Howard Hinnant's `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_times_and_modes() {
        assert_eq!(format_time(0, 0), "1970-01-01T00:00:00.000000000Z");
        assert_eq!(format_time(951_782_400, 5), "2000-02-29T00:00:00.000000005Z");
        assert_eq!(format_time(1_700_000_000, 123), "2023-11-14T22:13:20.000000123Z");
        assert_eq!(perm_string(0o040755), "drwxr-xr-x");
        assert_eq!(perm_string(0o104755), "-rwsr-xr-x");
        assert_eq!(perm_string(0o106644), "-rwSr-Sr--");
        assert_eq!(perm_string(0o041777), "drwxrwxrwt");
        assert_eq!(perm_string(0o041776), "drwxrwxrwT");
        assert_eq!(perm_string(0o120777), "lrwxrwxrwx");
        assert_eq!(xattr_value_text(b"abc"), "abc");
        assert_eq!(xattr_value_text(b"a\0"), "0x6100");
        assert_eq!(normalize("a//b/./"), "/a/b");
        assert_eq!(normalize(""), "/");
    }
}
