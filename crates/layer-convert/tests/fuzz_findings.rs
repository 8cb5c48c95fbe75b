//! Regression tests for what fuzzing the converter found (fuzz/README.md): each input,
//! reduced, refused with the right error kind and nothing left behind, or converted into
//! an image the validator accepts.

use std::path::Path;

use layer_convert::{convert, ErrorKind, Options};

/// One ustar header (name up to 100 bytes), with its checksum.
fn header(name: &[u8], typeflag: u8, size: usize, link: &[u8]) -> [u8; 512] {
    let mut h = [0u8; 512];
    h[..name.len()].copy_from_slice(name);
    h[100..108].copy_from_slice(b"0000644\0");
    h[108..116].copy_from_slice(b"0000000\0");
    h[116..124].copy_from_slice(b"0000000\0");
    h[124..136].copy_from_slice(format!("{size:011o}\0").as_bytes());
    h[136..148].copy_from_slice(b"14000000000\0");
    h[156] = typeflag;
    h[157..157 + link.len()].copy_from_slice(link);
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[148..156].fill(b' ');
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    h
}

/// One entry: name, typeflag, body, link target.
type TarEntry<'a> = (&'a [u8], u8, &'a [u8], &'a [u8]);

/// A tar of entries with its end marker.
fn tar(entries: &[TarEntry]) -> Vec<u8> {
    let mut t = Vec::new();
    for (name, ty, body, link) in entries {
        t.extend_from_slice(&header(name, *ty, body.len(), link));
        t.extend_from_slice(body);
        t.resize(t.len().next_multiple_of(512), 0);
    }
    t.resize(t.len() + 1024, 0);
    t
}

fn opts() -> Options {
    Options {
        media_type: Some("application/vnd.oci.image.layer.v1.tar".into()),
        ..Default::default()
    }
}

fn is_empty(dir: &Path) -> bool {
    std::fs::read_dir(dir).unwrap().next().is_none()
}

/// Found by `tar_convert`: `x/.wh..` became a child named `..` of `x`, a second `..`
/// record in the image (the kernel mounts it; fsck.erofs and the validator refuse it).
/// `.wh..` (hiding `.`) and `.wh...` (hiding `..`) are refused as invalid names.
#[test]
fn whiteouts_of_dot_and_dotdot_are_refused() {
    for name in [&b"x/.wh.."[..], b".wh..", b"x/.wh...", b".wh...", b"a/b/.wh.."] {
        let dir = tempfile::tempdir().unwrap();
        let t = tar(&[(b"x/", b'5', b"", b""), (name, b'0', b"", b"")]);
        let err = convert(&t[..], &dir.path().join("layer.erofs"), &opts(), None).unwrap_err();
        assert_eq!(
            err.kind,
            ErrorKind::InvalidName,
            "{}: {err}",
            String::from_utf8_lossy(name)
        );
        assert!(
            is_empty(dir.path()),
            "left behind for {}",
            String::from_utf8_lossy(name)
        );
    }
    // Ordinary whiteouts next to them still convert into a valid image.
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("layer.erofs");
    let t = tar(&[
        (b"x/", b'5', b"", b""),
        (b"x/.wh.y", b'0', b"", b""),
        (b"x/..z", b'0', b"z", b""),
    ]);
    convert(&t[..], &out, &opts(), None).unwrap();
    erofs::validate_path(&out).unwrap();
}
