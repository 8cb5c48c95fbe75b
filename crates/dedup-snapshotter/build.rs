//! Records the git revision the binary was built from, for `--version` (an operator
//! reporting a bug names the exact build; the crate version alone does not change
//! between commits).

use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
        .filter(|s| !s.is_empty())
}

fn main() {
    let rev = git(&["rev-parse", "--short=12", "HEAD"]).map_or_else(
        || "unknown revision".to_string(),
        |r| {
            // Only tracked files count as a change: build outputs and scratch files do not.
            let dirty = git(&["status", "--porcelain", "--untracked-files=no"]).is_some();
            if dirty {
                format!("git {r}-dirty")
            } else {
                format!("git {r}")
            }
        },
    );
    println!("cargo:rustc-env=DEDUP_GIT_REVISION={rev}");
    // Rebuild when HEAD moves (a commit, a checkout); not on every `git add`, so the
    // dirty mark can lag until the next commit.
    if let Some(dir) = git(&["rev-parse", "--absolute-git-dir"]) {
        println!("cargo:rerun-if-changed={dir}/HEAD");
        if let Some(head_ref) = git(&["symbolic-ref", "-q", "HEAD"]) {
            println!("cargo:rerun-if-changed={dir}/{head_ref}");
        }
    }
}
