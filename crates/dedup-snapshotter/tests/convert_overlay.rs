//! Layers stacked by the kernel: each layer tar is converted and mounted, the
//! mounts are stacked with overlayfs (`lowerdir=top:…:bottom`, read-only), and
//! the merged view must equal GNU tar extracting the layers in order onto one
//! directory with OCI whiteout semantics applied by this test.
//!
//! This is what proves whiteouts and opaque directories are written in the
//! form overlayfs honours. Needs root, erofs and overlay: panics without them.

mod common;

use std::fs;
use std::os::unix::fs::{lchown, symlink, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use common::*;

/// One layer's source tree, built on disk; `.wh.*` files are ordinary files
/// there and become OCI whiteout entries in the tar.
struct Layer {
    dir: TestDir,
}

impl Layer {
    fn new() -> Layer {
        let l = Layer { dir: tempdir() };
        set_mode(l.dir.path(), 0o755);
        l
    }

    fn p(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn dir(self, rel: &str, mode: u32) -> Self {
        fs::create_dir_all(self.p(rel)).unwrap();
        set_mode(&self.p(rel), mode);
        self
    }

    fn file(self, rel: &str, data: &str) -> Self {
        fs::write(self.p(rel), data).unwrap();
        self
    }

    fn owned(self, rel: &str, uid: u32, gid: u32, mode: u32) -> Self {
        lchown(self.p(rel), Some(uid), Some(gid)).unwrap();
        if !fs::symlink_metadata(self.p(rel)).unwrap().is_symlink() {
            set_mode(&self.p(rel), mode);
        }
        self
    }

    fn link(self, rel: &str, target: &str) -> Self {
        symlink(target, self.p(rel)).unwrap();
        self
    }

    fn hardlink(self, rel: &str, existing: &str) -> Self {
        fs::hard_link(self.p(existing), self.p(rel)).unwrap();
        self
    }

    fn xattr(self, rel: &str, name: &str, value: &str) -> Self {
        lsetxattr(&self.p(rel), name, value.as_bytes());
        self
    }

    fn whiteout(self, rel: &str) -> Self {
        let p = Path::new(rel);
        let name = format!(".wh.{}", p.file_name().unwrap().to_str().unwrap());
        let wh = p.parent().unwrap().join(name);
        fs::write(self.dir.path().join(wh), "").unwrap();
        self
    }

    fn opaque(self, rel_dir: &str) -> Self {
        fs::write(self.p(rel_dir).join(".wh..wh..opq"), "").unwrap();
        self
    }

    /// Gives every entry a distinct fixed mtime (children first, so the
    /// parents' times stick), making mtime mismatches visible.
    fn stamp(self, base: i64) -> Self {
        let mut all = Vec::new();
        collect(self.dir.path(), &mut all);
        all.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        for (i, p) in all.iter().enumerate() {
            set_mtime(p, base + i as i64, (i as i64 * 7919) % 1_000_000_000);
        }
        self
    }
}

fn collect(p: &Path, out: &mut Vec<PathBuf>) {
    out.push(p.to_path_buf());
    if fs::symlink_metadata(p).unwrap().is_dir() {
        for e in fs::read_dir(p).unwrap() {
            collect(&e.unwrap().path(), out);
        }
    }
}

fn remove_any(p: &Path) {
    match fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(p).unwrap(),
        Ok(_) => fs::remove_file(p).unwrap(),
        Err(_) => {}
    }
}

/// Metadata of a directory entry, taken before the merge disturbs it.
struct Meta {
    md: fs::Metadata,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

fn meta_of(p: &Path) -> Meta {
    Meta {
        md: fs::symlink_metadata(p).unwrap(),
        xattrs: lxattrs(p),
    }
}

/// Makes `dst`'s own metadata `m` (the upper layer's entry wins for a
/// directory present in several layers, xattrs included).
fn copy_meta(m: &Meta, dst: &Path) {
    lchown(dst, Some(m.md.uid()), Some(m.md.gid())).unwrap();
    fs::set_permissions(dst, fs::Permissions::from_mode(m.md.mode() & 0o7777)).unwrap();
    for (name, _) in lxattrs(dst) {
        let p = std::ffi::CString::new(dst.as_os_str().as_encoded_bytes()).unwrap();
        let n = std::ffi::CString::new(name).unwrap();
        // SAFETY: valid NUL-terminated strings.
        let rc = unsafe { libc::lremovexattr(p.as_ptr(), n.as_ptr()) };
        assert_eq!(rc, 0, "lremovexattr {}", dst.display());
    }
    for (name, value) in &m.xattrs {
        lsetxattr(dst, std::str::from_utf8(name).unwrap(), value);
    }
    set_mtime(dst, m.md.mtime(), m.md.mtime_nsec());
}

/// Applies one extracted layer (`src`) onto the accumulated tree (`dst`) with
/// OCI semantics: an opaque marker empties the lower directory first, a
/// `.wh.NAME` deletes NAME from below, anything else replaces what is there
/// (directories merge). Whiteouts only affect lower layers, so they are
/// processed before the layer's own entries.
fn apply_layer(src: &Path, dst: &Path) {
    // Moving children out of `src` changes its mtime: read it first.
    let src_meta = meta_of(src);
    let mut names: Vec<String> = fs::read_dir(src)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    if names.iter().any(|n| n == ".wh..wh..opq") {
        for e in fs::read_dir(dst).unwrap() {
            remove_any(&e.unwrap().path());
        }
    }
    for n in names.iter().filter(|n| n.starts_with(".wh.") && *n != ".wh..wh..opq") {
        remove_any(&dst.join(&n[4..]));
    }
    for n in names.iter().filter(|n| !n.starts_with(".wh.")) {
        let (s, d) = (src.join(n), dst.join(n));
        if fs::symlink_metadata(&s).unwrap().is_dir() {
            if !fs::symlink_metadata(&d).is_ok_and(|m| m.is_dir()) {
                remove_any(&d);
                fs::create_dir(&d).unwrap();
            }
            apply_layer(&s, &d);
        } else {
            remove_any(&d);
            // rename keeps the inode, so hard links within the layer stay linked.
            fs::rename(&s, &d).unwrap();
        }
    }
    copy_meta(&src_meta, dst);
}

/// Converts every layer (bottom first), stacks the mounts with overlayfs,
/// and compares the merged view with the whiteout-aware GNU tar merge.
fn check_stack(what: &str, layers: &[Layer]) {
    require_root_and_kernel();
    let work = tempdir();
    let merged = work.path().join("merged");
    fs::create_dir(&merged).unwrap();
    let mut images = Vec::new();
    // As the store writes layers: file data block-aligned, which merged metadata points at.
    let mut aligned = Vec::new();
    for (i, layer) in layers.iter().enumerate() {
        let tar = work.path().join(format!("layer{i}.tar"));
        gnu_create(layer.dir.path(), &tar, TarFormat::Posix);
        let input = compress(&tar, Compression::Gzip);
        let image = work.path().join(format!("layer{i}.erofs"));
        convert_ok(&input, &image, &[]);
        fsck(&image);
        images.push(image);
        let image = work.path().join(format!("layer{i}-aligned.erofs"));
        convert_ok(&input, &image, &["--no-inline"]);
        aligned.push(image);
        let scratch = work.path().join(format!("scratch{i}"));
        gnu_extract(&tar, &scratch);
        apply_layer(&scratch, &merged);
    }
    let mounts: Vec<Mount> = images.iter().map(|i| Mount::erofs(i)).collect();
    let lowers: Vec<&Path> = mounts.iter().rev().map(|m| m.path()).collect();
    let ovl = Mount::overlay(&lowers);
    let actual = snapshot_tree(ovl.path());
    let expected = snapshot_tree(&merged);
    assert_trees_eq(
        &format!(
            "{what}: overlay of {} layers vs OCI merge of GNU tar extractions",
            layers.len()
        ),
        &expected,
        &actual,
        &CompareOpts::default(),
    );
    // Merged metadata over the same layers: one EROFS mount, the layers its devices,
    // shows the same tree, whether the layers' files are pointed at (block-aligned) or
    // copied (tails packed after their inodes).
    for (kind, imgs) in [("block-aligned", &aligned), ("packed tails", &images)] {
        let out = work.path().join("merged.erofs");
        let devices = merge_ok(&out, imgs);
        // Small files with packed tails are copied: those layers need no device.
        if kind == "block-aligned" {
            assert_eq!(devices.len(), imgs.len(), "{what}, {kind}: one device per layer");
        }
        let img = erofs::reader::Image::open_with_devices(&out, &devices).unwrap();
        img.validate()
            .unwrap_or_else(|e| panic!("{what}, {kind}: the merged image does not validate: {e}"));
        let m = Mount::erofs_with_devices(&out, &devices);
        assert_trees_eq(
            &format!("{what}: merged metadata ({kind}) vs OCI merge of GNU tar extractions"),
            &expected,
            &snapshot_tree(m.path()),
            &CompareOpts::default(),
        );
    }
    check_vmdk(what, work.path(), &aligned, &expected);
}

/// Merged metadata as one flat device for VM runtimes: `merge --vmdk` writes a VMDK
/// descriptor that `qemu-img info` accepts; `qemu-img convert` of it to a raw file
/// mounts as EROFS with no extra devices and shows the same tree as the overlay stack.
fn check_vmdk(what: &str, work: &Path, layers: &[PathBuf], expected: &Tree) {
    let out = work.join("flat.erofs");
    let vmdk = work.join("flat.vmdk");
    let devices = merge_ok_with(&out, layers, &["--vmdk", vmdk.to_str().unwrap()]);
    // Mounted with its devices, a flat image is an ordinary one.
    let m = Mount::erofs_with_devices(&out, &devices);
    assert_trees_eq(
        &format!("{what}: flat merged image with devices"),
        expected,
        &snapshot_tree(m.path()),
        &CompareOpts::default(),
    );
    drop(m);
    let info = qemu_img_info(&vmdk);
    let total: u64 = std::iter::once(&out)
        .chain(&devices)
        .map(|p| fs::metadata(p).unwrap().len().div_ceil(4096) * 4096)
        .sum();
    assert_eq!(info["virtual-size"].as_u64(), Some(total), "{info}");
    let raw = work.join("flat.raw");
    qemu_img_raw(&vmdk, &raw);
    let m = Mount::erofs(&raw);
    assert_trees_eq(
        &format!("{what}: qemu-img convert of the VMDK, mounted with no extra devices"),
        expected,
        &snapshot_tree(m.path()),
        &CompareOpts::default(),
    );
}

/// `dedup-snapshotter merge --json OUT LAYERS...`: the devices to mount OUT with.
fn merge_ok(out: &Path, layers: &[PathBuf]) -> Vec<PathBuf> {
    merge_ok_with(out, layers, &[])
}

fn merge_ok_with(out: &Path, layers: &[PathBuf], extra: &[&str]) -> Vec<PathBuf> {
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_dedup-snapshotter"))
        .arg("merge")
        .arg("--json")
        .args(extra)
        .arg(out)
        .args(layers)
        .output()
        .unwrap();
    assert!(o.status.success(), "merge: {}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    v["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| PathBuf::from(d.as_str().unwrap()))
        .collect()
}

fn base_layer() -> Layer {
    Layer::new()
        .dir("etc", 0o755)
        .file("etc/a", "a\n")
        .file("etc/b", "b\n")
        .file("etc/c", "c\n")
        .dir("etc/sub", 0o755)
        .file("etc/sub/x", "x\n")
        .file("etc/sub/y", "y\n")
        .dir("bin", 0o755)
        .file("bin/tool", "v1")
        .owned("bin/tool", 0, 0, 0o4755)
        .dir("var", 0o755)
        .dir("var/log", 0o750)
        .file("var/log/old.log", "old")
        .file("var/keep", "below opaque")
        .dir("data", 0o755)
        .file("data/file_then_dir", "file")
        .dir("data/dir_then_file", 0o700)
        .file("data/dir_then_file/child", "child")
        .dir("data/dir_then_file/nested", 0o755)
        .file("data/dir_then_file/nested/deeper", "deeper")
        .file("data/hl-a", "linked")
        .hardlink("data/hl-b", "data/hl-a")
        .link("data/symlink", "hl-a")
        .xattr("etc", "user.layer", "bottom")
        .xattr("etc/c", "trusted.note", "bottom c")
}

/// Two layers: deletions of a file and a directory, an opaque directory that
/// re-adds some entries, file→dir and dir→file replacements, changed
/// metadata on a directory present in both layers.
#[test]
fn two_layers_with_whiteouts_and_opaque_dir() {
    let bottom = base_layer().stamp(1_600_000_000);
    let top = Layer::new()
        .dir("etc", 0o750)
        .owned("etc", 10, 20, 0o750)
        .xattr("etc", "user.layer", "top")
        .whiteout("etc/a")
        .whiteout("etc/sub")
        .file("etc/new", "new\n")
        .dir("bin", 0o755)
        .file("bin/tool", "v2 replaced")
        .owned("bin/tool", 0, 0, 0o755)
        .dir("var", 0o755)
        .opaque("var")
        .file("var/fresh", "re-added under opaque")
        .dir("var/log", 0o755)
        .file("var/log/new.log", "new log")
        .dir("data", 0o755)
        .dir("data/file_then_dir", 0o755)
        .file("data/file_then_dir/inside", "now a dir")
        .file("data/dir_then_file", "now a file")
        .whiteout("data/symlink")
        .stamp(1_700_000_000);
    check_stack("two layers", &[bottom, top]);
}

// Whiteouts of hard-linked files are left out on purpose: overlayfs reports
// the lower inode's nlink for the surviving name, while a real deletion
// lowers it, so the two legitimately differ.

/// Three layers: the middle deletes what the top re-creates, an opaque
/// directory in the middle that the top extends, a path that is a file, then
/// a directory, then a file again.
#[test]
fn three_layers() {
    let bottom = base_layer().stamp(1_500_000_000);
    let mid = Layer::new()
        .dir("etc", 0o755)
        .whiteout("etc/b")
        .whiteout("etc/sub")
        .dir("var", 0o755)
        .opaque("var")
        .file("var/mid-only", "mid")
        .file("var/to-delete-later", "mid")
        .dir("data", 0o755)
        .dir("data/file_then_dir", 0o711)
        .file("data/file_then_dir/mid-child", "mid child")
        .file("data/hl-c", "mid linked")
        .hardlink("data/hl-d", "data/hl-c")
        .file("data/mid-doomed", "deleted by top")
        .dir("newdir", 0o755)
        .dir("newdir/a", 0o755)
        .file("newdir/a/f", "f")
        .stamp(1_600_000_000);
    let top = Layer::new()
        .dir("etc", 0o755)
        .file("etc/b", "b is back")
        .dir("etc/sub", 0o700)
        .file("etc/sub/z", "only z now")
        .dir("var", 0o755)
        .whiteout("var/to-delete-later")
        .file("var/top-only", "top")
        .dir("data", 0o755)
        .file("data/file_then_dir", "file again")
        .whiteout("data/mid-doomed")
        .dir("newdir", 0o755)
        .opaque("newdir")
        .file("newdir/b", "b")
        .stamp(1_700_000_000);
    check_stack("three layers", &[bottom, mid, top]);
}

/// A layer that makes a directory opaque and also whites out names in it:
/// the whiteouts are redundant (the opaque marker already hides everything
/// below) and must not reach the image, because overlayfs reads a directory
/// that is opaque in the topmost layer as a plain directory, so a whiteout
/// device there shows up in readdir while lstat says ENOENT.
#[test]
fn whiteout_inside_opaque_dir_of_same_layer() {
    let bottom = Layer::new()
        .dir("dir", 0o755)
        .file("dir/old", "old")
        .file("dir/gone", "gone")
        .stamp(1_600_000_000);
    let top = Layer::new()
        .dir("dir", 0o755)
        .opaque("dir")
        .whiteout("dir/gone")
        .whiteout("dir/never-existed")
        .file("dir/new", "new")
        .stamp(1_700_000_000);
    check_stack("whiteouts inside a same-layer opaque dir", &[bottom, top]);
}
