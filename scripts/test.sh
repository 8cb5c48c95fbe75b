#!/bin/bash
# The one "run all tests" command of dedup-snapshotter.
#
#   sudo scripts/test.sh            (as root, on Debian 12)
#
# 1. installs the Debian packages the tests use, when missing;
# 2. checks it is root and that the kernel has erofs and overlay
#    (modprobe-ing them if needed), failing loudly otherwise;
# 3. cargo fmt --check, cargo clippy -D warnings, cargo build --release;
# 4. warms the fixtures: the debian-minbase layer (debootstrap, a few minutes
#    the first time; cached in ${DEDUP_CACHE:-/var/cache/dedup-snapshotter-tests})
#    and the OCI images of the end-to-end tests (scripts/build-test-images.sh);
# 5. cargo test --workspace --release --features root-tests --no-fail-fast:
#    both tiers (the unit tier, and the root tier, whose test binaries are
#    only built with the `root-tests` feature; README.md, "Tests in two
#    tiers"); every test binary runs even when an earlier one fails; then one
#    closing summary line
#    "tests: N passed, N failed, N skipped" (skipped = #[ignore]d);
# 6. containerd 1.6's and 2.1's snapshotter suites against the daemon, a short
#    fuzzing run of every fuzz target (scripts/fuzz-smoke.sh) and a leak check,
#    each counted in that line.
#
# Exits non-zero on any failure.  Extra arguments go to `cargo test` (after
# the workspace selection), e.g. `scripts/test.sh -- --nocapture`.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

step() { printf '\n==> %s\n' "$*" >&2; }
die() {
    printf 'test.sh: FATAL: %s\n' "$*" >&2
    exit 1
}

# --- root -------------------------------------------------------------------
[[ $(id -u) -eq 0 ]] || die "must run as root (tests mount EROFS images with mount(2) and run debootstrap)"

# --- cargo on PATH (rustup installs into ~/.cargo/bin) ------------------------
if ! command -v cargo >/dev/null && [[ -f "$HOME/.cargo/env" ]]; then
    # shellcheck source=/dev/null
    . "$HOME/.cargo/env"
fi
command -v cargo >/dev/null || die "cargo not found (install Rust with rustup)"

# --- Debian packages ------------------------------------------------------------
# package => a file it installs (cheap "is it there?" check without dpkg locks)
declare -A PKG_FILE=(
    [erofs-utils]=/usr/bin/fsck.erofs
    [attr]=/usr/bin/getfattr
    [debootstrap]=/usr/sbin/debootstrap
    [pigz]=/usr/bin/pigz
    [zstd]=/usr/bin/zstd
    [python3]=/usr/bin/python3
    [busybox-static]=/bin/busybox
    [fuse3]=/usr/bin/fusermount3
    [kmod]=/sbin/modprobe
    # end-to-end tests: a private containerd 1.6 + runc + loopback registry
    [containerd]=/usr/bin/containerd
    [runc]=/usr/sbin/runc
    [docker-registry]=/usr/bin/docker-registry
    [skopeo]=/usr/bin/skopeo
    [umoci]=/usr/bin/umoci
    [curl]=/usr/bin/curl
    [iproute2]=/bin/ss
    # containerd 1.7's transfer-service tests serve the registry over TLS too
    [openssl]=/usr/bin/openssl
    # containerd-client's build script compiles containerd's protos with protoc
    [protobuf-compiler]=/usr/bin/protoc
    # the Debian package's test (scripts/package.sh runs dpkg-shlibdeps) and the units' (systemd-analyze verify)
    [dpkg-dev]=/usr/bin/dpkg-shlibdeps
    [systemd]=/usr/bin/systemd-analyze
    # merged metadata's VMDK descriptors are checked with qemu-img
    [qemu-utils]=/usr/bin/qemu-img
)
missing=()
for pkg in "${!PKG_FILE[@]}"; do
    [[ -e "${PKG_FILE[$pkg]}" ]] || missing+=("$pkg")
done
if ((${#missing[@]})); then
    step "installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update
    apt-get install -y --no-install-recommends "${missing[@]}"
fi

# --- kernel file systems -----------------------------------------------------
for fs in erofs overlay fuse; do
    if ! grep -qw "$fs" /proc/filesystems; then
        step "modprobe $fs"
        modprobe "$fs" || true
    fi
    grep -qw "$fs" /proc/filesystems ||
        die "the kernel has no '$fs' file system (not in /proc/filesystems, modprobe $fs failed); the tests cannot run here"
done

# --- lint, build ----------------------------------------------------------------
step "cargo fmt --all -- --check"
cargo fmt --all -- --check

# Every step builds with the root tier's feature: clippy then lints its test binaries too, and
# the release binaries the tests spawn are the ones `cargo test` builds (one build, not two).
TIERS=(--features root-tests)

step "cargo clippy --workspace --all-targets ${TIERS[*]} -- -D warnings"
cargo clippy --workspace --all-targets "${TIERS[@]}" -- -D warnings

step "cargo build --workspace --release ${TIERS[*]}"
cargo build --workspace --release "${TIERS[@]}"

# --- fixtures -------------------------------------------------------------------
FIXTURE=crates/dedup-snapshotter/tests/fixtures/debian-minbase.sh
if [[ -f "$FIXTURE" ]]; then
    step "warming the debian-minbase fixture"
    tgz=$(bash "$FIXTURE")
    [[ -s "$tgz" ]] || die "$FIXTURE printed '$tgz', which is not a non-empty file"
    echo "fixture: $tgz" >&2
else
    echo "note: $FIXTURE not found, no fixture to warm" >&2
fi
IMAGES=scripts/build-test-images.sh
if [[ -f "$IMAGES" ]]; then
    step "warming the end-to-end test images"
    bash "$IMAGES" "${E2E_IMAGES:-/var/cache/dedup-snapshotter-tests/oci}"
fi
# The lazy-pull tests' image: minbase + python3 from Debian packages (cached).
step "warming the python test image (scripts/build-python-image.sh)"
bash scripts/build-python-image.sh build >/dev/null
# erofs-utils 1.9.4 from Debian forky's source package (cached): the fsck.erofs every converted
# image is checked with (the system's 1.5 lacks zstd, DEFLATE and newer layouts), and the
# mkfs.erofs whose compressed images the reader must read.
step "warming erofs-utils 1.9.4 (scripts/lib/erofs-utils.sh)"
bash scripts/lib/erofs-utils.sh install >/dev/null || die "cannot build erofs-utils 1.9.4 (scripts/lib/erofs-utils.sh)"
# The containerd matrix: 1.6 is the system's; 1.7.24 and 2.1.9 from Debian trixie/forky (cached).
step "warming containerd 1.7 and 2.1 (scripts/lib/containerd-versions.sh)"
for v in 1.7 2.1; do
    bash scripts/lib/containerd-versions.sh install "$v" >/dev/null ||
        die "cannot install containerd $v (scripts/lib/containerd-versions.sh)"
done
# The Go harnesses (containerd's own client code) the end-to-end tests drive.
step "building the test harnesses (scripts/harness/build.sh)"
for h in diffclient suite suite2; do
    bash scripts/harness/build.sh "$h" >/dev/null || die "cannot build the $h harness"
done

# --- disk -----------------------------------------------------------------------
# The tests write a 5 GiB layer image (/var/tmp), layer images and registries (/tmp): with less
# room they fail with ENOSPC in places that do not say why. Say it here, once.
need_gib=10
for d in /var/tmp /tmp; do
    free_kib=$(df -Pk "$d" | awk 'NR == 2 { print $4 }')
    if ((free_kib < need_gib * 1024 * 1024)); then
        df -h "$d" >&2
        die "only $((free_kib / 1024 / 1024)) GiB free under $d: the tests need $need_gib GiB (a 5 GiB image among them)"
    fi
done

# --- tests ----------------------------------------------------------------------
# What is mounted and running now, for the leak check after the tests (scripts/lib/leak-check.sh);
# every process the tests start inherits DEDUP_LEAK_MARK, which tells the ones left running.
leak_state=$ROOT/target/leak-check
DEDUP_LEAK_MARK=$(bash scripts/lib/leak-check.sh snapshot "$leak_state")
export DEDUP_LEAK_MARK
step "cargo test --workspace --release ${TIERS[*]} --no-fail-fast $*"
log=$(mktemp /tmp/dedup-test.XXXXXX.log)
trap 'rm -f "$log"' EXIT
rc=0
cargo test --workspace --release "${TIERS[@]}" --no-fail-fast "$@" 2>&1 | tee "$log" || rc=$?

# --- containerd's own snapshotter suite against our daemon -------------------------
# scripts/harness/suite.sh builds containerd 1.6's snapshots/testsuite (Debian's Go and
# containerd sources, installed when missing) and suite2.sh the same suite from containerd
# 2.1.9's sources (core/snapshots/testsuite; trixie's Go 1.24 and forky's Go packages,
# unpacked into the cache, never installed); binaries cached under
# ${DEDUP_CACHE:-/var/cache/dedup-snapshotter-tests}/harness. Each runs with one fresh
# daemon per case; both suites' cases count in the closing line. A failed build fails
# the run like a failed case.
suite_log=$(mktemp /tmp/dedup-suite.XXXXXX.log)
trap 'rm -f "$log" "$suite_log"' EXIT
run_suite() { # SCRIPT TITLE: appends go test -v's output to $suite_log
    local out suite_rc=0
    step "$2 (scripts/harness/$1)"
    out=$(mktemp /tmp/dedup-suite.XXXXXX.log)
    bash "scripts/harness/$1" "$ROOT/target/release/dedup-snapshotter serve --root {root} --address {socket}" \
        >"$out" 2>&1 || suite_rc=$?
    grep -E '^\s*--- (PASS|FAIL|SKIP)' "$out" >&2 || true
    if ((suite_rc != 0)); then
        grep -vE '^\s*(=== |--- PASS)' "$out" | tail -60 >&2
        rc=1
    fi
    cat "$out" >>"$suite_log"
    rm -f "$out"
}
run_suite suite.sh "containerd 1.6 snapshotter conformance suite"
run_suite suite2.sh "containerd 2.1 snapshotter conformance suite"

# --- a short fuzzing run of every target (scripts/fuzz-smoke.sh; fuzz/README.md) ------
# Stable toolchain, no sanitizer, FUZZ_SECONDS (default 20) per target from the committed
# seeds; one pseudo-case line, "--- PASS/FAIL: fuzz-smoke". A crash, timeout or failed
# build fails the run; the input is kept in fuzz/artifacts/<target>/.
step "fuzz smoke run (scripts/fuzz-smoke.sh, ${FUZZ_SECONDS:-20} s per target)"
if FUZZ_SECONDS=${FUZZ_SECONDS:-20} bash scripts/fuzz-smoke.sh >&2; then
    echo "    --- PASS: fuzz-smoke" >>"$suite_log"
else
    echo "    --- FAIL: fuzz-smoke" >>"$suite_log"
    rc=1
fi

# --- leftovers: no mount or process of the tests may outlive them ---------------------
# Lists what the tests left mounted or running that was not there before them, cleans
# it up (lazy unmount, kill) and writes one pseudo-case line, "--- PASS/FAIL: leak-check".
step "leak check: mounts and processes left behind (scripts/lib/leak-check.sh)"
leak_log=$leak_state/result
bash scripts/lib/leak-check.sh check "$leak_state" >"$leak_log" || rc=1
cat "$leak_log" >&2

# One closing line over all test binaries (cargo prints one "test result:"
# line per binary, the last being the doc-tests of the last crate), the
# conformance cases (go test -v prints one "--- PASS/FAIL/SKIP" line per case)
# and the leak check (one such line).
awk '
    FNR == NR && /^test result: / {
        for (i = 1; i <= NF; i++) {
            if ($(i) ~ /^passed/)  p += $(i - 1)
            if ($(i) ~ /^failed/)  f += $(i - 1)
            if ($(i) ~ /^ignored/) s += $(i - 1)
        }
    }
    FNR != NR && /^ +--- PASS/ { p++ }
    FNR != NR && /^ +--- FAIL/ { f++ }
    FNR != NR && /^ +--- SKIP/ { s++ }
    END { printf "tests: %d passed, %d failed, %d skipped\n", p, f, s }
' "$log" "$suite_log" "$leak_log"
exit "$rc"
