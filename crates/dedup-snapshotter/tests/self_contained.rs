//! The repository carries everything its tests run: no script or test may reach for the
//! harnesses that used to live beside the work tree (a `shared/` directory next to the
//! clone). A fresh clone has no such directory, so any such path is a test that cannot run.
//!
//! Scans every file under `scripts/`, `.ci/` and `crates/*/tests/` for those paths and
//! checks that the repo's own harnesses (`scripts/harness/`) are there. Needs nothing
//! but the source tree (no root, no network).
//!
//!     cargo test -p dedup-snapshotter --test self_contained

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// The workspace root: this crate lives in `crates/dedup-snapshotter`.
fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("workspace root")
}

/// What a reference to the outside harnesses looks like. Assembled from pieces so that
/// this file does not match itself.
fn needles() -> Vec<String> {
    let dir = ["sha", "red"].concat();
    vec![
        format!("{dir}/conformance"),
        format!("/work/{dir}"),
        format!("../{dir}/"),
    ]
}

/// Benchmark scripts, not tests: they still default to the outside diffclient and are
/// left to their owners. Remove an entry once its script points at scripts/harness/.
const NOT_TESTS: &[&str] = &[];

/// Regular files below `dir`, recursively (symlinks are not followed).
fn files_under(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = fs::read_dir(dir) else { return };
    for entry in entries {
        let entry = entry.expect("read_dir entry");
        let ft = entry.file_type().expect("file type");
        if ft.is_dir() {
            files_under(&entry.path(), out);
        } else if ft.is_file() {
            out.push(entry.path());
        }
    }
}

fn scanned_files(root: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    files_under(&root.join("scripts"), &mut files);
    files_under(&root.join(".ci"), &mut files);
    for krate in fs::read_dir(root.join("crates")).expect("crates/") {
        files_under(&krate.expect("crates/ entry").path().join("tests"), &mut files);
    }
    files.sort();
    files
}

#[test]
fn no_test_path_reaches_outside_the_repo() {
    let root = repo();
    let files = scanned_files(&root);
    assert!(
        files.iter().any(|f| f.ends_with("scripts/test.sh")),
        "the scan found no scripts/test.sh under {}: {files:?}",
        root.display()
    );
    let needles = needles();
    let mut hits = Vec::new();
    for file in &files {
        let rel = file.strip_prefix(&root).unwrap_or(file);
        if NOT_TESTS.iter().any(|n| rel == Path::new(n)) {
            continue;
        }
        let bytes = fs::read(file).unwrap_or_else(|e| panic!("read {}: {e}", file.display()));
        let text = String::from_utf8_lossy(&bytes);
        for (n, line) in text.lines().enumerate() {
            if needles.iter().any(|needle| line.contains(needle.as_str())) {
                hits.push(format!("{}:{}: {}", rel.display(), n + 1, line.trim()));
            }
        }
    }
    assert!(
        hits.is_empty(),
        "{} line(s) depend on harnesses outside the repository (use scripts/harness/ instead):\n{}",
        hits.len(),
        hits.join("\n")
    );
}

#[test]
fn the_harnesses_are_in_the_repo() {
    let harness = repo().join("scripts/harness");
    for script in ["build.sh", "suite.sh", "suite2.sh", "diffclient.sh", "reference.sh"] {
        let p = harness.join(script);
        let meta = fs::metadata(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        assert!(
            meta.permissions().mode() & 0o111 != 0,
            "{} is not executable",
            p.display()
        );
    }
    for tool in ["suite", "suite2", "diffclient", "reference"] {
        let dir = harness.join(tool);
        let go_files = fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .filter(|e| {
                e.as_ref()
                    .is_ok_and(|e| e.path().extension().is_some_and(|x| x == "go"))
            })
            .count();
        assert!(go_files > 0, "{} holds no Go sources", dir.display());
    }
}
