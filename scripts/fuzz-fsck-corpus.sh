#!/usr/bin/env bash
# The part of the converter fuzz oracle that needs outside tools, replayed over a tar
# corpus (default: fuzz/seeds/tar plus fuzz/corpus/tar_convert when a fuzzing run left
# one): every layer the converter accepts must give an image that erofs-utils 1.9.4's
# fsck.erofs accepts, and (as root) that the kernel mounts with the same tree fsck.erofs
# extracts (path, type, mode, size, link target, device numbers, file bytes).
#
#   scripts/fuzz-fsck-corpus.sh [DIR...]
#
# Needs the release binary (`cargo build --release -p dedup-snapshotter`; DEDUP_BIN to
# override) and erofs-utils 1.9.4 (scripts/lib/erofs-utils.sh builds it into the cache).
# Exits non-zero listing every input whose image fsck.erofs refuses or the kernel shows
# differently.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${DEDUP_BIN:-$ROOT/target/release/dedup-snapshotter}
[ -x "$BIN" ] || { echo "fuzz-fsck-corpus: $BIN is missing (cargo build --release -p dedup-snapshotter)" >&2; exit 1; }
EU=$("$ROOT/scripts/lib/erofs-utils.sh" install) || { echo "fuzz-fsck-corpus: no erofs-utils 1.9.4" >&2; exit 1; }
dirs=("$@")
if [ ${#dirs[@]} -eq 0 ]; then
    dirs=("$ROOT/fuzz/seeds/tar")
    [ -d "$ROOT/fuzz/corpus/tar_convert" ] && dirs+=("$ROOT/fuzz/corpus/tar_convert")
fi
work=$(mktemp -d)
mnt="$work/mnt"
mkdir -p "$mnt"
cleanup() {
    mountpoint -q "$mnt" && umount "$mnt"
    rm -rf "$work"
}
trap cleanup EXIT
# One line per path: type, mode, size (not of directories: that is the filesystem's own
# layout), link target or device, and a digest of the bytes.
tree() {
    (cd "$1" && { find . -type d -printf '%p\t%y\t%m\n'; find . ! -type d -printf '%p\t%y\t%m\t%s\t%l\n'; } | sort) ||
        return 1
    (cd "$1" && find . -type f -print0 | sort -z | xargs -0r sha256sum) || return 1
    (cd "$1" && find . \( -type c -o -type b \) -print0 | sort -z | xargs -0r stat -c '%n %t:%T') || return 1
}
bad=()
n=0
accepted=0
for d in "${dirs[@]}"; do
    for f in "$d"/*; do
        [ -f "$f" ] || continue
        n=$((n + 1))
        img="$work/img"
        rm -f "$img"
        if ! "$BIN" convert --media-type application/vnd.oci.image.layer.v1.tar "$f" "$img" >/dev/null 2>&1; then
            continue
        fi
        accepted=$((accepted + 1))
        rm -rf "$work/x"
        if ! "$EU/fsck.erofs" --extract="$work/x" "$img" >"$work/fsck.log" 2>&1; then
            bad+=("$f: fsck.erofs: $(tail -n 3 "$work/fsck.log" | tr '\n' ' ')")
            continue
        fi
        if [ "$(id -u)" = 0 ]; then
            if ! mount -t erofs -o ro,loop "$img" "$mnt" 2>"$work/mount.log"; then
                bad+=("$f: the kernel refuses the mount: $(cat "$work/mount.log")")
                continue
            fi
            if ! diff <(tree "$work/x") <(tree "$mnt") >"$work/diff" 2>&1; then
                bad+=("$f: the kernel's tree differs from fsck.erofs's: $(head -c 400 "$work/diff")")
            fi
            umount "$mnt"
        fi
    done
done
echo "fuzz-fsck-corpus: $n inputs, $accepted accepted, ${#bad[@]} bad" >&2
if [ ${#bad[@]} -gt 0 ]; then
    printf '%s\n' "${bad[@]}" >&2
    exit 1
fi
