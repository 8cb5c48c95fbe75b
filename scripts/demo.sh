#!/bin/bash
# Demo: build the release binary, make a small OCI layer (a busybox-static
# rootfs, tar+gzip), convert it to an EROFS image in one pass, look at the
# image with the binary's own reader, check it with erofs-utils' fsck.erofs,
# mount it (mount(2) straight on the image file, no loop device) and run
# /bin/busybox from it with chroot.
#
# Then the real thing: a private containerd 1.6 and a loopback registry in
# target/demo/env (scripts/e2e-env.sh), the sample images built and pushed
# (scripts/build-test-images.sh), our daemon as containerd's proxy snapshotter
# `dedup` running with --dedup, and `ctr image pull` + `ctr run` of a busybox
# image, a three-layer image with whiteouts and a second image repeating
# busybox's files through it; `dedup-snapshotter stats` then shows what the
# images share. Everything is stopped and
# unmounted on exit. DEMO_CONTAINERD=0 skips that part.
#
#   sudo scripts/demo.sh
#
# Artifacts stay in target/demo/ (layer.tar.gz, layer.erofs, convert.json);
# the mount point is unmounted and removed on exit, whatever happens.
# Idempotent: run it as often as you like.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

step() { printf '\n==> %s\n' "$*"; }
die() {
    printf 'demo.sh: FATAL: %s\n' "$*" >&2
    exit 1
}

[[ $(id -u) -eq 0 ]] || die "must run as root (mount(2), chroot)"
if ! command -v cargo >/dev/null && [[ -f "$HOME/.cargo/env" ]]; then
    # shellcheck source=/dev/null
    . "$HOME/.cargo/env"
fi

# What the demo needs from Debian (installed only when missing).
declare -A PKG_FILE=(
    [busybox-static]=/bin/busybox
    [erofs-utils]=/usr/bin/fsck.erofs
    [attr]=/usr/bin/getfattr
    [python3]=/usr/bin/python3
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
grep -qw erofs /proc/filesystems || modprobe erofs || true
grep -qw erofs /proc/filesystems || die "the kernel has no erofs file system"

W="$ROOT/target/demo"
MNT="$W/mnt"
LAYER="$W/layer.tar.gz"
IMG="$W/layer.erofs"
BIN="$ROOT/target/release/dedup-snapshotter"

umount_mnt() {
    if mountpoint -q "$MNT" 2>/dev/null; then
        umount "$MNT"
    fi
}
cleanup() {
    local rc=$?
    umount_mnt || echo "demo.sh: could not unmount $MNT" >&2
    rmdir "$MNT" 2>/dev/null || true
    exit "$rc"
}
trap cleanup EXIT

# A previous run that was killed hard may have left the image mounted.
umount_mnt
rm -rf "$W"
mkdir -p "$W"

step "cargo build --release -p dedup-snapshotter"
cargo build --release -p dedup-snapshotter
[[ -x "$BIN" ]] || die "$BIN was not built"

step "building a sample layer: $LAYER"
# Written with Python's tarfile so that owners, modes, xattrs and times are
# exactly what we say (no dependence on the build host's file system), and
# deterministic: same bytes every run.
python3 - "$LAYER" <<'PY'
import gzip, io, sys, tarfile

out = sys.argv[1]
MTIME = 1700000000
busybox = open("/bin/busybox", "rb").read()

tf_raw = gzip.GzipFile(out, "wb", mtime=0)
tar = tarfile.open(fileobj=tf_raw, mode="w", format=tarfile.PAX_FORMAT)

def add(name, type=tarfile.REGTYPE, mode=0o644, data=b"", uid=0, gid=0,
        linkname="", xattrs=None):
    ti = tarfile.TarInfo(name)
    ti.type, ti.mode, ti.uid, ti.gid, ti.mtime = type, mode, uid, gid, MTIME
    ti.uname = ti.gname = "root" if uid == 0 else ""
    ti.linkname = linkname
    if xattrs:
        ti.pax_headers = {"SCHILY.xattr." + k: v for k, v in xattrs.items()}
    if type == tarfile.REGTYPE:
        ti.size = len(data)
        tar.addfile(ti, io.BytesIO(data))
    else:
        tar.addfile(ti)

D, L, H = tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE
add("bin/", D, 0o755)
add("bin/busybox", mode=0o755, data=busybox)
for applet in ["sh", "echo", "ls", "cat", "ps", "uname"]:
    add("bin/" + applet, L, 0o777, linkname="busybox")
add("sbin/", D, 0o755)
add("sbin/init", H, 0o755, linkname="bin/busybox")   # a hard link
add("etc/", D, 0o755)
add("etc/hostname", data=b"erofs-demo\n")
add("etc/passwd", data=b"root:x:0:0:root:/root:/bin/sh\n"
                       b"user:x:1000:1000:user:/home/user:/bin/sh\n")
add("etc/group", data=b"root:x:0:\nuser:x:1000:\n")
add("etc/os-release", data=b'NAME="dedup-snapshotter demo"\nID=demo\n')
add("etc/motd", data=b"This file carries an extended attribute.\n",
    xattrs={"user.demo": "hello xattr"})
add("etc/.wh.shadow", mode=0o600)                      # whiteout: etc/shadow deleted
add("usr/bin/su-demo", mode=0o4755,                    # setuid root; usr/, usr/bin/ implicit
    data=b"#!/bin/sh\necho setuid demo\n")
add("usr/share/doc/demo/README", data=b"Implicit parent directories get 0755 root:root.\n")
add("var/cache/apt/", D, 0o755)
add("var/cache/apt/.wh..wh..opq")                      # opaque: hide the lower layers' content
add("var/cache/apt/kept", data=b"only this survives\n")
add("home/user/", D, 0o750, uid=1000, gid=1000)
add("home/user/notes.txt", data=b"owned by 1000:1000\n", uid=1000, gid=1000)
add("tmp/", D, 0o1777)
tar.close()
tf_raw.close()
PY
ls -l "$LAYER"
tar -tvzf "$LAYER"

step "dedup-snapshotter convert --json $LAYER $IMG"
"$BIN" convert --json "$LAYER" "$IMG" | tee "$W/convert.json"
python3 -m json.tool "$W/convert.json" >/dev/null || die "convert --json did not print JSON"

step "dedup-snapshotter inspect $IMG"
"$BIN" inspect "$IMG"

step "dedup-snapshotter ls -R $IMG /"
"$BIN" ls "$IMG" / -R

step "dedup-snapshotter cat $IMG /etc/hostname"
"$BIN" cat "$IMG" /etc/hostname

step "fsck.erofs $IMG (erofs-utils $(dpkg-query -W -f='${Version}' erofs-utils 2>/dev/null || echo '?'))"
fsck.erofs "$IMG"

step "mount(2) -t erofs -o ro $IMG $MNT   (file-backed, no loop device)"
mkdir -p "$MNT"
python3 - "$IMG" "$MNT" <<'PY'
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_void_p]
MS_RDONLY = 1
if libc.mount(sys.argv[1].encode(), sys.argv[2].encode(), b"erofs", MS_RDONLY, None) != 0:
    sys.exit("mount: " + os.strerror(ctypes.get_errno()))
PY
grep " $MNT " /proc/mounts

step "ls -lanR $MNT"
ls -lanR "$MNT"

step "what the whiteouts became, and the xattrs"
# .wh.shadow -> character device 0/0 "shadow"; .wh..wh..opq -> trusted.overlay.opaque=y
stat -c '%A %t:%T %n' "$MNT/etc/shadow"
getfattr --absolute-names -n trusted.overlay.opaque "$MNT/var/cache/apt"
getfattr --absolute-names -d "$MNT/etc/motd"
stat -c "%A %u:%g %n" "$MNT/usr/bin/su-demo" "$MNT/home/user" "$MNT/tmp" "$MNT/usr/share/doc"
stat -c '%i %h %n' "$MNT/bin/busybox" "$MNT/sbin/init"
cmp /bin/busybox "$MNT/bin/busybox" && echo "bin/busybox: identical to /bin/busybox"

step "chroot $MNT /bin/busybox echo hello from erofs"
chroot "$MNT" /bin/busybox echo hello from erofs
chroot "$MNT" /bin/sh -c 'cat /etc/hostname; uname -sr'

step "umount $MNT"
umount "$MNT"
rmdir "$MNT"
echo
echo "converter demo OK: layer $LAYER -> image $IMG"

[[ ${DEMO_CONTAINERD:-1} == 1 ]] || exit 0

# --- containerd with the dedup snapshotter ------------------------------------------
ENVDIR="$W/env"
stop_env() { bash "$ROOT/scripts/e2e-env.sh" stop "$ENVDIR" >/dev/null 2>&1 || true; }
trap 'rc=$?; stop_env; cleanup_rc=$rc; umount_mnt || true; exit $cleanup_rc' EXIT
stop_env
rm -rf "$ENVDIR"
step "starting a registry, containerd and dedup-snapshotter --dedup in $ENVDIR (builds the sample images once)"
bash "$ROOT/scripts/e2e-env.sh" start "$ENVDIR" "$BIN serve --root {root} --address {socket} --dedup"
# shellcheck source=/dev/null
. "$ENVDIR/env"
ctr_() { ctr -a "$E2E_CONTAINERD_SOCK" -n "$E2E_NAMESPACE" "$@"; }

for img in busybox layered busybox-plus; do
    step "ctr image pull --snapshotter dedup $E2E_REGISTRY/$img:latest"
    ctr_ image pull --plain-http --snapshotter dedup "$E2E_REGISTRY/$img:latest" >/dev/null
done
step "ctr run --snapshotter dedup busybox: echo"
ctr_ run --rm --snapshotter dedup "$E2E_REGISTRY/busybox:latest" demo-1 /bin/echo hello from a container on EROFS layers
step "ctr run --snapshotter dedup layered: a deleted file, an opaque dir, an updated file"
ctr_ run --rm --snapshotter dedup "$E2E_REGISTRY/layered:latest" demo-2 \
    /bin/sh -c 'ls /data; echo "dir: $(ls /data/dir)"; echo "keep: $(cat /data/keep)"'
step "the snapshots, and what containerd's Commit left on disk"
ctr_ snapshot --snapshotter dedup ls
for d in "$E2E_SNAPSHOTTER_ROOT"/snapshots/*/; do
    if [[ -f "$d/layer.erofs" ]]; then
        printf '%s layer.erofs %s bytes, fs/ entries: %s, fsck: ' "$d" "$(stat -c %s "$d/layer.erofs")" "$(ls -A "$d/fs" | wc -l)"
        # A dedup layer names its chunk blobs as extra devices: fsck needs them too.
        mapfile -t devs < <("$BIN" inspect --json "$d/layer.erofs" | python3 -c '
import json, sys
for d in json.load(sys.stdin).get("devices") or []:
    print("--device=" + sys.argv[1] + "/blobs/" + d["tag"])' "$E2E_SNAPSHOTTER_ROOT")
        fsck.erofs "${devs[@]}" "$d/layer.erofs" >/dev/null && echo "ok (${#devs[@]} blob devices)"
    fi
done
step "dedup-snapshotter stats: busybox's file data is stored once for the three images"
"$BIN" stats --root "$E2E_SNAPSHOTTER_ROOT"
grep " erofs " /proc/mounts | grep "$ENVDIR" | awk '{print "mounted:", $1, "on", $2}'
echo
echo "demo OK: converter, and containerd pulling and running through dedup-snapshotter"
