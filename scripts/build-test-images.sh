#!/usr/bin/env bash
# Builds the OCI image layouts the end-to-end tests push to a local registry.
#
# usage: build-test-images.sh OUTDIR
#
# OUTDIR/busybox  one layer: busybox-static + applet symlinks, /etc/passwd, /etc/group
# OUTDIR/layered  three layers over the busybox rootfs:
#                   1. base: + /data/{keep,gone,gone2,dir/a,dir/b}            (umoci unpack/repack)
#                   2. deletes /data/gone (.wh.gone) and makes /data/dir opaque (.wh..wh..opq) holding only `c`
#                      (a hand-made tar added verbatim with `umoci raw add-layer`: umoci itself never writes
#                      opaque whiteouts)
#                   3. adds /data/new, rewrites /data/keep, deletes /data/gone2 (umoci unpack/repack, so umoci
#                      writes the .wh.gone2 whiteout itself)
# OUTDIR/minbase  Debian bookworm minbase as one gzip layer, the cached tarball of
#                 crates/dedup-snapshotter/tests/fixtures/debian-minbase.sh, laid out directly (no repacking)
# OUTDIR/busybox-plus  one layer: the busybox rootfs again plus /extra/{data,data-copy} (1 MiB of fixed
#                 pseudo-random bytes, twice): another image repeating busybox's files, for dedup
# OUTDIR/pause  one layer: the busybox rootfs, entrypoint `/bin/sleep 2147483647`: the pod sandbox image of the
#                 CRI tests (a sandbox's process must outlive the pod's containers)
# Every layout has the tag `latest`.  OUTDIR is reused when OUTDIR/.complete holds the current recipe version.
# Needs root (umoci unpack as root keeps owners), umoci, busybox-static.
set -euo pipefail

RECIPE=5
out=${1:?usage: build-test-images.sh OUTDIR}
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)

if [[ -f "$out/.complete" && "$(cat "$out/.complete")" == "$RECIPE" ]]; then
    exit 0
fi
for tool in umoci sha256sum gzip tar; do
    command -v "$tool" >/dev/null || {
        echo "build-test-images.sh: $tool missing: apt-get install -y umoci busybox-static" >&2
        exit 1
    }
done
busybox=""
for b in /bin/busybox /usr/bin/busybox; do
    if [[ -x "$b" ]] && file -L "$b" 2>/dev/null | grep -q 'statically linked'; then busybox=$b; break; fi
done
if [[ -z "$busybox" ]]; then
    echo "build-test-images.sh: a static busybox is missing: apt-get install -y busybox-static" >&2
    exit 1
fi

mkdir -p "$(dirname "$out")"
tmp=$(mktemp -d "$out.build.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

APPLETS="sh ls cat echo true false stat find sha256sum wc test sleep mkdir rm head tail sort tr xargs env id touch grep
mount readlink uname dd cp mv ln"

busybox_rootfs() { # DIR: fills DIR (an umoci bundle rootfs) with the busybox userland
    local r=$1 a
    mkdir -p "$r"/{bin,etc,tmp,proc,sys,dev,root}
    chmod 1777 "$r/tmp"
    cp "$busybox" "$r/bin/busybox"
    chmod 0755 "$r/bin/busybox"
    for a in $APPLETS; do ln -sf busybox "$r/bin/$a"; done
    printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' >"$r/etc/passwd"
    printf 'root:x:0:\nnogroup:x:65534:\n' >"$r/etc/group"
}

new_image() { # LAYOUT
    umoci init --layout "$1"
    umoci new --image "$1:latest"
    umoci config --image "$1:latest" --config.env 'PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --config.cmd /bin/sh --config.workingdir /
}

# (a) busybox
echo "build-test-images: busybox" >&2
new_image "$tmp/busybox"
umoci unpack --image "$tmp/busybox:latest" "$tmp/b1"
busybox_rootfs "$tmp/b1/rootfs"
umoci repack --image "$tmp/busybox:latest" "$tmp/b1"

# (b) layered
echo "build-test-images: layered" >&2
L=$tmp/layered
new_image "$L"
umoci unpack --image "$L:latest" "$tmp/l1"
busybox_rootfs "$tmp/l1/rootfs"
mkdir -p "$tmp/l1/rootfs/data/dir"
echo 'keep v1' >"$tmp/l1/rootfs/data/keep"
echo 'gone' >"$tmp/l1/rootfs/data/gone"
echo 'gone2' >"$tmp/l1/rootfs/data/gone2"
echo 'a' >"$tmp/l1/rootfs/data/dir/a"
echo 'b' >"$tmp/l1/rootfs/data/dir/b"
umoci repack --image "$L:latest" "$tmp/l1"

mkdir -p "$tmp/l2/data/dir"
: >"$tmp/l2/data/.wh.gone"
: >"$tmp/l2/data/dir/.wh..wh..opq"
echo 'c' >"$tmp/l2/data/dir/c"
chmod 0755 "$tmp/l2/data" "$tmp/l2/data/dir"
chmod 0644 "$tmp/l2/data/.wh.gone" "$tmp/l2/data/dir/.wh..wh..opq" "$tmp/l2/data/dir/c"
tar --numeric-owner --owner=0 --group=0 --sort=name -C "$tmp/l2" -cf "$tmp/layer2.tar" data
umoci raw add-layer --image "$L:latest" --history.created_by 'whiteout /data/gone, opaque /data/dir' "$tmp/layer2.tar"

umoci unpack --image "$L:latest" "$tmp/l3"
if [[ -e "$tmp/l3/rootfs/data/gone" || "$(ls -A "$tmp/l3/rootfs/data/dir")" != c ]]; then
    echo "build-test-images: umoci did not apply layer 2 as expected" >&2
    exit 1
fi
echo 'keep v2' >"$tmp/l3/rootfs/data/keep"
echo 'new' >"$tmp/l3/rootfs/data/new"
rm "$tmp/l3/rootfs/data/gone2"
umoci repack --image "$L:latest" "$tmp/l3"
umoci gc --layout "$L"

# (c) minbase: the cached tarball laid out as an OCI image directly.
echo "build-test-images: minbase" >&2
tgz=$("$repo/crates/dedup-snapshotter/tests/fixtures/debian-minbase.sh")
tar_=${tgz%.gz}
M=$tmp/minbase
mkdir -p "$M/blobs/sha256"
printf '{"imageLayoutVersion":"1.0.0"}' >"$M/oci-layout"
ldig=$(sha256sum "$tgz" | cut -d' ' -f1)
lsize=$(stat -c %s "$tgz")
diffid=$(sha256sum "$tar_" | cut -d' ' -f1)
ln "$tgz" "$M/blobs/sha256/$ldig" 2>/dev/null || cp "$tgz" "$M/blobs/sha256/$ldig"
arch=$(dpkg --print-architecture 2>/dev/null || echo amd64)
blob() { # writes stdin as a blob, prints "DIGEST SIZE"
    local f d
    f=$(mktemp "$M/blobs/.tmp.XXXXXX")
    cat >"$f"
    d=$(sha256sum "$f" | cut -d' ' -f1)
    mv "$f" "$M/blobs/sha256/$d"
    chmod 0644 "$M/blobs/sha256/$d"
    echo "$d $(stat -c %s "$M/blobs/sha256/$d")"
}
read -r cdig csize < <(printf '%s' "{\"architecture\":\"$arch\",\"os\":\"linux\",\"config\":{\"Env\":[\"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\"],\"Cmd\":[\"/bin/bash\"]},\"rootfs\":{\"type\":\"layers\",\"diff_ids\":[\"sha256:$diffid\"]},\"history\":[{\"created_by\":\"debootstrap --variant=minbase bookworm\"}]}" | blob)
read -r mdig msize < <(printf '%s' "{\"schemaVersion\":2,\"mediaType\":\"application/vnd.oci.image.manifest.v1+json\",\"config\":{\"mediaType\":\"application/vnd.oci.image.config.v1+json\",\"digest\":\"sha256:$cdig\",\"size\":$csize},\"layers\":[{\"mediaType\":\"application/vnd.oci.image.layer.v1.tar+gzip\",\"digest\":\"sha256:$ldig\",\"size\":$lsize}]}" | blob)
printf '%s' "{\"schemaVersion\":2,\"manifests\":[{\"mediaType\":\"application/vnd.oci.image.manifest.v1+json\",\"digest\":\"sha256:$mdig\",\"size\":$msize,\"annotations\":{\"org.opencontainers.image.ref.name\":\"latest\"}}]}" >"$M/index.json"

# (d) busybox-plus
echo "build-test-images: busybox-plus" >&2
new_image "$tmp/busybox-plus"
umoci unpack --image "$tmp/busybox-plus:latest" "$tmp/p1"
busybox_rootfs "$tmp/p1/rootfs"
mkdir -p "$tmp/p1/rootfs/extra"
# Fixed bytes (the same every build): 1 MiB of a SHA-256 counter stream.
python3 -c '
import hashlib, sys
sys.stdout.buffer.write(b"".join(hashlib.sha256(i.to_bytes(8, "little")).digest() for i in range(32768)))
' >"$tmp/p1/rootfs/extra/data"
cp "$tmp/p1/rootfs/extra/data" "$tmp/p1/rootfs/extra/data-copy"
umoci repack --image "$tmp/busybox-plus:latest" "$tmp/p1"
umoci gc --layout "$tmp/busybox-plus"

# (e) pause
echo "build-test-images: pause" >&2
new_image "$tmp/pause"
umoci unpack --image "$tmp/pause:latest" "$tmp/s1"
busybox_rootfs "$tmp/s1/rootfs"
umoci repack --image "$tmp/pause:latest" "$tmp/s1"
umoci config --image "$tmp/pause:latest" --config.entrypoint /bin/sleep --config.cmd 2147483647
umoci gc --layout "$tmp/pause"

# Install: only complete layouts move into OUTDIR.
mkdir -p "$out"
for img in busybox layered minbase busybox-plus pause; do
    rm -rf "$out/$img"
    mv "$tmp/$img" "$out/$img"
done
echo "$RECIPE" >"$out/.complete"
echo "build-test-images: done in $out" >&2
