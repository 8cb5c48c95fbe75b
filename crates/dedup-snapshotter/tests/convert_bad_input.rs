//! Inputs the converter must refuse: every case must exit non-zero, print an
//! `error:` line, report the error's kind (and the tar entry where there is
//! one) in `convert --json`'s machine-readable error, and leave nothing
//! behind: no OUTPUT and no `.OUTPUT.tmp*` next to it.
//! Also: stdin (`-`) input works and gives the same image as a file.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use common::*;

/// A fresh directory holding only the would-be OUTPUT, so "nothing left
/// behind" is simply "the directory is still empty".
struct Case {
    work: TestDir,
    outdir: PathBuf,
}

impl Case {
    fn new() -> Case {
        let work = tempdir();
        let outdir = work.path().join("out");
        fs::create_dir(&outdir).unwrap();
        Case { work, outdir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.work.path().join(name)
    }

    fn output(&self) -> PathBuf {
        self.outdir.join("layer.erofs")
    }

    /// Converts `input` with `--json` and asserts a clean refusal of one of `kinds` (any kind when
    /// empty) naming tar entry `entry` when given.
    fn expect_failure(&self, what: &str, input: &Path, extra: &[&str], kinds: &[&str], entry: Option<&str>) {
        let mut args = vec!["--json"];
        args.extend_from_slice(extra);
        let out = convert(input, &self.output(), &args);
        self.check_failure(what, &out, kinds, entry);
    }

    /// A clean refusal: non-zero exit, a human `error:` line on stderr, the machine-readable error
    /// on stdout (`convert --json`: `{"error": {"kind", "entry", ...}}`) of one of `kinds` (any when
    /// empty) naming `entry` when given, and nothing left in OUTPUT's directory. The kind is
    /// checked, not the message's words.
    fn check_failure(&self, what: &str, out: &Output, kinds: &[&str], entry: Option<&str>) {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let stdout = String::from_utf8_lossy(&out.stdout);
        let mut errs = Vec::new();
        if out.status.success() {
            errs.push("exited 0".to_string());
        }
        if !stderr.lines().any(|l| l.starts_with("error:")) {
            errs.push("no stderr line starts with `error:`".to_string());
        }
        let err = stdout
            .lines()
            .last()
            .and_then(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .map(|v| v["error"].clone())
            .filter(|e| e.is_object());
        match &err {
            None => errs.push("no `{\"error\": ...}` line on stdout".to_string()),
            Some(e) => {
                let kind = e["kind"].as_str().unwrap_or("");
                if !kinds.is_empty() && !kinds.contains(&kind) {
                    errs.push(format!("error kind {kind:?}, want one of {kinds:?}"));
                }
                if let Some(want) = entry {
                    if e["entry"].as_str() != Some(want) {
                        errs.push(format!("error entry {}, want {want:?}", e["entry"]));
                    }
                }
            }
        }
        let left = dir_entries(&self.outdir);
        if !left.is_empty() {
            errs.push(format!("left behind in OUTPUT's directory: {left:?}"));
        }
        assert!(
            errs.is_empty(),
            "{what}: {}\nexit: {}\nstdout:\n{stdout}\nstderr:\n{stderr}",
            errs.join("; "),
            out.status
        );
    }
}

/// Writes a small valid tar: `d/`, `d/file1` (1000 bytes), `d/file2` (3000
/// bytes), laid out as headers at 0, 512, 2048 and data at 1024, 2560.
fn base_tar(path: &Path) -> Vec<u8> {
    python(
        r#"
import io, sys, tarfile
with tarfile.open(sys.argv[1], "w", format=tarfile.USTAR_FORMAT) as t:
    ti = tarfile.TarInfo("d"); ti.type = tarfile.DIRTYPE; ti.mode = 0o755; t.addfile(ti)
    for name, size in (("d/file1", 1000), ("d/file2", 3000)):
        ti = tarfile.TarInfo(name); ti.size = size
        t.addfile(ti, io.BytesIO(bytes((i * 7) % 251 for i in range(size))))
"#,
        &[path.as_os_str()],
    );
    let b = fs::read(path).unwrap();
    assert_eq!(&b[2048..2055], b"d/file2", "unexpected layout of the base tar");
    b
}

/// Recomputes a ustar header's checksum after editing it.
fn fix_checksum(hdr: &mut [u8]) {
    hdr[148..156].fill(b' ');
    let sum: u32 = hdr[..512].iter().map(|&b| u32::from(b)).sum();
    hdr[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
}

/// Writes an uncompressed tar with python's tarfile from `body` (helpers
/// `add(name, kind, data, link)`).
fn crafted_tar(path: &Path, body: &str) {
    python(
        &format!(
            r#"
import io, sys, tarfile
t = tarfile.open(sys.argv[1], "w", format=tarfile.PAX_FORMAT)
def add(name, kind="f", data=b"", link=""):
    ti = tarfile.TarInfo(name)
    ti.type = {{"f": tarfile.REGTYPE, "d": tarfile.DIRTYPE, "l": tarfile.SYMTYPE, "h": tarfile.LNKTYPE}}[kind]
    ti.linkname = link
    ti.size = len(data)
    t.addfile(ti, io.BytesIO(data) if kind == "f" else None)
{body}
t.close()
"#
        ),
        &[path.as_os_str()],
    );
}

fn write(path: &Path, data: &[u8]) -> PathBuf {
    fs::write(path, data).unwrap();
    path.to_path_buf()
}

fn gzip_bytes(data: &[u8]) -> Vec<u8> {
    pipe(&["gzip", "-c", "-n"], data)
}

fn zstd_bytes(data: &[u8]) -> Vec<u8> {
    pipe(&["zstd", "-c", "-q"], data)
}

fn pipe(cmd: &[&str], data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut child = Command::new(cmd[0])
        .args(&cmd[1..])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let data = data.to_vec();
    let feeder = std::thread::spawn(move || stdin.write_all(&data).unwrap());
    let out = child.wait_with_output().unwrap();
    feeder.join().unwrap();
    assert!(out.status.success(), "{cmd:?} failed");
    out.stdout
}

#[test]
fn truncated_tar_mid_header() {
    let c = Case::new();
    let tar = base_tar(&c.path("base.tar"));
    let input = write(&c.path("cut.tar"), &tar[..2048 + 100]);
    c.expect_failure("tar cut inside a header", &input, &[], &["Truncated"], None);
}

#[test]
fn truncated_tar_mid_data() {
    let c = Case::new();
    let tar = base_tar(&c.path("base.tar"));
    let input = write(&c.path("cut.tar"), &tar[..2560 + 500]);
    c.expect_failure(
        "tar cut inside d/file2's data",
        &input,
        &[],
        &["Truncated"],
        Some("d/file2"),
    );
}

/// A tar that simply stops after a complete entry (no end-of-archive
/// blocks) is also truncated: the last entry could have been cut.
#[test]
fn truncated_tar_between_entries_is_accepted_or_named() {
    let c = Case::new();
    let tar = base_tar(&c.path("base.tar"));
    let input = write(&c.path("cut.tar"), &tar[..2048]);
    let out = convert(&input, &c.output(), &["--json"]);
    // Accepting is what GNU tar and Go's archive/tar do (a missing
    // end-of-archive marker is tolerated); failing must still be clean.
    if !out.status.success() {
        c.check_failure("tar without end-of-archive", &out, &["Truncated"], None);
    } else {
        fs::remove_file(c.output()).unwrap();
    }
}

#[test]
fn bad_header_checksum() {
    let c = Case::new();
    let mut tar = base_tar(&c.path("base.tar"));
    tar[2048 + 148..2048 + 156].copy_from_slice(b"0001234\0");
    let input = write(&c.path("bad.tar"), &tar);
    c.expect_failure("bad checksum on d/file2's header", &input, &[], &["BadHeader"], None);
}

#[test]
fn size_larger_than_stream() {
    let c = Case::new();
    let mut tar = base_tar(&c.path("base.tar"));
    let h = &mut tar[2048..2560];
    h[124..136].copy_from_slice(b"00000100000\0"); // 32 KiB, stream has ~3.5 KiB left
    fix_checksum(h);
    let input = write(&c.path("big.tar"), &tar);
    c.expect_failure(
        "d/file2 claims more data than the stream has",
        &input,
        &[],
        &["Truncated"],
        Some("d/file2"),
    );
}

#[test]
fn truncated_gzip() {
    let c = Case::new();
    let gz = gzip_bytes(&base_tar(&c.path("base.tar")));
    let input = write(&c.path("cut.tar.gz"), &gz[..gz.len() / 2]);
    c.expect_failure("gzip cut in half", &input, &[], &["Truncated"], None);
}

#[test]
fn corrupt_gzip() {
    let c = Case::new();
    let gz = gzip_bytes(&base_tar(&c.path("base.tar")));
    let mut bad = gz.clone();
    // Flip bytes in the middle of the deflate stream (header is 10 bytes,
    // trailer 8): either the stream is invalid or the CRC32 catches it.
    let mid = gz.len() / 2;
    for b in &mut bad[mid..mid + 4] {
        *b ^= 0x5a;
    }
    let input = write(&c.path("bad.tar.gz"), &bad);
    c.expect_failure("gzip with flipped bytes", &input, &[], &["Decompress"], None);
}

#[test]
fn gzip_with_bad_crc_trailer() {
    let c = Case::new();
    let mut gz = gzip_bytes(&base_tar(&c.path("base.tar")));
    let n = gz.len();
    gz[n - 8] ^= 0xff; // CRC32 of the data: the only thing that can catch bit rot
    let input = write(&c.path("crc.tar.gz"), &gz);
    c.expect_failure("gzip with a wrong CRC32", &input, &[], &["Decompress"], None);
}

#[test]
fn truncated_zstd() {
    let c = Case::new();
    let zst = zstd_bytes(&base_tar(&c.path("base.tar")));
    let input = write(&c.path("cut.tar.zst"), &zst[..zst.len() / 2]);
    c.expect_failure("zstd cut in half", &input, &[], &["Truncated"], None);
}

#[test]
fn corrupt_zstd() {
    let c = Case::new();
    // Incompressible content so the frame is mostly literal blocks and
    // flipping bytes in the middle cannot hit only padding.
    let mut data = base_tar(&c.path("base.tar"));
    data.truncate(1024);
    data.extend(pseudo_random(64 * 1024, 5));
    let zst = pipe(&["zstd", "-c", "-q", "--check"], &data);
    let mut bad = zst.clone();
    let mid = zst.len() / 2;
    for b in &mut bad[mid..mid + 8] {
        *b ^= 0xa5;
    }
    let input = write(&c.path("bad.tar.zst"), &bad);
    c.expect_failure("zstd with flipped bytes", &input, &[], &["Decompress"], None);
}

#[test]
fn path_escaping_root() {
    for name in ["../evil", "a/../../evil", "./../evil"] {
        let c = Case::new();
        let input = c.path("escape.tar");
        crafted_tar(&input, &format!("add('ok', data=b'fine')\nadd({name:?}, data=b'x')"));
        c.expect_failure(&format!("entry {name}"), &input, &[], &["PathEscape"], Some(name));
    }
}

#[test]
fn hard_link_to_missing_target() {
    let c = Case::new();
    let input = c.path("hl.tar");
    crafted_tar(
        &input,
        "add('present', data=b'x')\nadd('hl_entry', 'h', link='no_such_target')",
    );
    c.expect_failure(
        "hard link to a path not in the layer",
        &input,
        &[],
        &["LinkTarget"],
        Some("hl_entry"),
    );
}

#[test]
fn entry_under_a_regular_file() {
    let c = Case::new();
    let input = c.path("under-file.tar");
    crafted_tar(&input, "add('f', data=b'file')\nadd('f/child', data=b'x')");
    c.expect_failure(
        "f/child where f is a file",
        &input,
        &[],
        &["NotADirectory"],
        Some("f/child"),
    );
}

/// Following the symlink would write outside the layer (or into another
/// directory than the name says): it must be refused, not resolved.
#[test]
fn entry_under_a_symlink() {
    for (target, what) in [("d", "inside"), ("/etc", "absolute"), ("../..", "escaping")] {
        let c = Case::new();
        let input = c.path("under-link.tar");
        crafted_tar(
            &input,
            &format!("add('d', 'd')\nadd('s', 'l', link={target:?})\nadd('s/child', data=b'x')"),
        );
        c.expect_failure(
            &format!("s/child where s is a symlink ({what})"),
            &input,
            &[],
            &["NotADirectory"],
            Some("s/child"),
        );
    }
}

/// 2 GiB of zeros in a ~2 MiB gzip, converted with `--max-size 100M`: the
/// converter must stop at the limit instead of writing a 2 GiB image.
#[test]
fn decompression_bomb_hits_max_size() {
    require_tools();
    let c = Case::new();
    let bomb = c.path("bomb.tar.gz");
    // A valid header for a 2 GiB file, then the zeros, streamed through gzip.
    let hdr = python(
        r#"
import sys, tarfile
ti = tarfile.TarInfo("zeros"); ti.size = 2 << 30
sys.stdout.buffer.write(ti.tobuf(format=tarfile.USTAR_FORMAT))
"#,
        &[],
    )
    .stdout;
    fs::write(c.path("hdr"), hdr).unwrap();
    let status = Command::new("sh")
        .arg("-c")
        .arg("(cat \"$1\"; head -c 2G /dev/zero; head -c 1024 /dev/zero) | gzip -1 -c > \"$2\"")
        .arg("sh")
        .arg(c.path("hdr"))
        .arg(&bomb)
        .status()
        .unwrap();
    assert!(status.success());
    let start = std::time::Instant::now();
    c.expect_failure(
        "2 GiB gzip bomb with --max-size 100M",
        &bomb,
        &["--max-size", "100M"],
        &["SizeLimit"],
        None,
    );
    // Stopping at the limit means reading ~100 MiB, not 2 GiB.
    assert!(
        start.elapsed().as_secs() < 60,
        "took {:?}: the limit must stop decompression early",
        start.elapsed()
    );
}

#[test]
fn unknown_compression_xz() {
    let c = Case::new();
    let xz = pipe(&["xz", "-c"], &base_tar(&c.path("base.tar")));
    let input = write(&c.path("layer.tar.xz"), &xz);
    c.expect_failure("xz-compressed input", &input, &[], &["Unsupported"], None);
}

#[test]
fn unknown_media_type() {
    let c = Case::new();
    let input = write(&c.path("layer.tar"), &base_tar(&c.path("base.tar")));
    c.expect_failure(
        "unknown --media-type",
        &input,
        &["--media-type", "application/vnd.example.layer.v1.tar+lz4"],
        &["Unsupported"],
        None,
    );
}

#[test]
fn missing_input_file() {
    let c = Case::new();
    let input = c.path("does-not-exist.tar");
    c.expect_failure("missing input", &input, &[], &["Io"], None);
}

/// `-` reads the layer from stdin: same image and report as from a file.
#[test]
fn stdin_input_matches_file_input() {
    require_tools();
    let c = Case::new();
    let tar = base_tar(&c.path("base.tar"));
    for (name, data) in [
        ("layer.tar", tar.clone()),
        ("layer.tar.gz", gzip_bytes(&tar)),
        ("layer.tar.zst", zstd_bytes(&tar)),
    ] {
        let input = write(&c.path(name), &data);
        let from_file = c.path(&format!("{name}.file.erofs"));
        let file_report = convert_ok(&input, &from_file, &[]);
        let from_stdin = c.path(&format!("{name}.stdin.erofs"));
        let out = Command::new(bin())
            .args(["convert", "--json", "-"])
            .arg(&from_stdin)
            .stdin(fs::File::open(&input).unwrap())
            .output()
            .unwrap();
        let stdin_report = parse_report(&out, &format!("convert - ({name} on stdin)"));
        assert!(
            fs::read(&from_file).unwrap() == fs::read(&from_stdin).unwrap(),
            "{name}: image from stdin differs from image from the file"
        );
        for k in [
            "diff_id",
            "input_digest",
            "input_size",
            "uncompressed_size",
            "compression",
            "entries",
        ] {
            assert_eq!(file_report[k], stdin_report[k], "{name}: report field {k}");
        }
        assert_eq!(stdin_report["input_digest"].as_str(), Some(sha256_hex(&data).as_str()));
        assert_eq!(stdin_report["diff_id"].as_str(), Some(sha256_hex(&tar).as_str()));
        fsck(&from_stdin);
    }
}

/// A pipe on stdin must work too (not only a seekable file), e.g. `curl | convert -`.
#[test]
fn stdin_pipe_input() {
    let c = Case::new();
    let tar = base_tar(&c.path("base.tar"));
    let gz = gzip_bytes(&tar);
    let mut child = Command::new(bin())
        .args(["convert", "--json", "-"])
        .arg(c.output())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(&gz).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    let report = parse_report(&out, "convert - (gzip through a pipe)");
    assert_eq!(report["diff_id"].as_str(), Some(sha256_hex(&tar).as_str()));
    assert_eq!(report["compression"].as_str(), Some("gzip"));
    fsck(&c.output());
}

/// With compression on, a bad layer is refused the same way for every algorithm: the
/// segments still with the compression workers are dropped, the error names the entry,
/// and nothing is left behind.
#[test]
fn compressed_conversions_refuse_bad_input_cleanly() {
    require_tools();
    let c = Case::new();
    // 9 MiB of text (segments in flight when the cut is found), then a file cut short.
    let tar = python(
        r#"
import io, sys, tarfile
words = [b"layer ", b"erofs ", b"chunk\n", b"snapshot "]
body = b"".join(words[(i * 7 + i // 5) % 4] for i in range(1_700_000))[: 9 << 20]
buf = io.BytesIO()
with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
    for name, data in (("big.txt", body), ("cut.txt", body[:100000])):
        ti = tarfile.TarInfo(name)
        ti.size = len(data)
        t.addfile(ti, io.BytesIO(data))
data = buf.getvalue()
cut = tarfile.open(fileobj=io.BytesIO(data)).getmember("cut.txt").offset_data + 50000
sys.stdout.buffer.write(data[:cut])
"#,
        &[],
    )
    .stdout;
    let input = write(&c.path("cut.tar"), &tar);
    for codec in ["lz4", "lz4hc", "zstd", "deflate", "lzma"] {
        c.expect_failure(
            &format!("tar cut inside cut.txt, --compress {codec}"),
            &input,
            &["--compress", codec],
            &["Truncated"],
            Some("cut.txt"),
        );
    }
}
