#!/usr/bin/env python3
"""Writes the fuzz targets' seed corpora into fuzz/seeds/<target>/ (committed: small).

    fuzz/gen-seeds.py [CONVERTER]

Seeds are real layers in every tar flavour (ustar, GNU, PAX), the hostile cases of
crates/layer-apply/tests/hostile.rs and crates/dedup-snapshotter/tests/convert_bad_input.rs,
EROFS images from our converter (CONVERTER: the `dedup-snapshotter` binary, optional)
and from erofs-utils' mkfs.erofs (from directories and, with 1.9.4, from tars),
containerd filter strings, and manifests with lazy-layer annotations.
"""
import base64
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
SEEDS = os.path.join(HERE, "seeds")
MKFS_194 = "/var/cache/dedup-snapshotter-tests/erofs-utils-1.9.4/bin/mkfs.erofs"


def out(target, name, data):
    d = os.path.join(SEEDS, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def tar_bytes(fmt, entries):
    """entries: (name, kind, data/link, extra dict)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as t:
        for name, kind, payload, extra in entries:
            ti = tarfile.TarInfo(name)
            ti.mtime = extra.get("mtime", 1_600_000_000)
            ti.mode = extra.get("mode", 0o644)
            ti.uid = extra.get("uid", 0)
            ti.gid = extra.get("gid", 0)
            if "pax" in extra:
                ti.pax_headers = extra["pax"]
            body = None
            if kind == "f":
                ti.size = len(payload)
                body = io.BytesIO(payload)
            elif kind == "a":  # old-style regular file (type '\0')
                ti.type = tarfile.AREGTYPE
                ti.size = len(payload)
                body = io.BytesIO(payload)
            elif kind == "d":
                ti.type = tarfile.DIRTYPE
                ti.mode = extra.get("mode", 0o755)
            elif kind == "l":
                ti.type = tarfile.SYMTYPE
                ti.linkname = payload
            elif kind == "h":
                ti.type = tarfile.LNKTYPE
                ti.linkname = payload
            elif kind in "cb":
                ti.type = tarfile.CHRTYPE if kind == "c" else tarfile.BLKTYPE
                ti.devmajor, ti.devminor = payload
            elif kind == "p":
                ti.type = tarfile.FIFOTYPE
            t.addfile(ti, body)
    return buf.getvalue()


def content(n, seed):
    return bytes((i * 31 + seed) % 251 for i in range(n))


LAYERS = {
    "basic": [
        ("etc", "d", None, {}),
        ("etc/passwd", "f", b"root:x:0:0:root:/root:/bin/sh\n", {}),
        ("bin", "d", None, {}),
        ("bin/busybox", "f", content(9000, 1), {"mode": 0o755}),
        ("bin/sh", "l", "busybox", {}),
        ("bin/ls", "h", "bin/busybox", {}),
        ("dev", "d", None, {}),
        ("dev/null", "c", (1, 3), {"mode": 0o666}),
        ("dev/sda", "b", (8, 0), {}),
        ("run", "d", None, {}),
        ("run/fifo", "p", None, {}),
        ("empty", "f", b"", {}),
        ("block", "f", content(4096, 2), {}),
    ],
    "whiteouts": [
        ("a", "d", None, {}),
        ("a/.wh.gone", "f", b"", {}),
        ("a/kept", "f", b"kept", {}),
        ("b", "d", None, {}),
        ("b/.wh..wh..opq", "f", b"", {}),
        ("b/new", "f", b"new", {}),
        (".wh.c", "f", b"", {}),
        ("c/inside", "f", b"x", {}),
        ("d", "d", None, {}),
        ("d/.wh.x", "f", b"", {}),
        ("d/x", "f", b"same layer wins", {}),
        ("e/.wh..wh..opq", "f", b"", {}),
        ("e/.wh.y", "f", b"", {}),
        (".wh..wh.plnk", "d", None, {}),
    ],
    "replace": [
        ("x", "f", b"first", {}),
        ("x", "f", b"second", {}),
        ("d", "d", None, {"mode": 0o700}),
        ("d/f", "f", b"child", {}),
        ("d", "d", None, {"mode": 0o750, "uid": 7}),
        ("y", "d", None, {}),
        ("y/z", "f", b"z", {}),
        ("y", "f", b"dir replaced by a file", {}),
        ("./", "d", None, {"mode": 0o711}),
        ("./a/./b//c", "f", b"cleaned", {}),
        ("link", "h", "x", {}),
    ],
    # A whiteout beside this layer's own entry of the same name: the entry stays (a
    # directory becomes opaque, whiteouts in it go), before or after the whiteout.
    "whiteout-own": [
        ("d", "d", None, {}),
        ("d/f", "f", b"kept", {}),
        ("d/.wh.w", "f", b"", {}),
        (".wh.d", "f", b"", {}),
        ("g", "f", b"file", {}),
        (".wh.g", "f", b"", {}),
        (".wh.h", "f", b"", {}),
        ("h", "d", None, {"mode": 0o700}),
        ("h/i", "f", b"i", {}),
        (".wh.j", "f", b"", {}),
        ("j/k", "f", b"k", {}),
    ],
    # Spellings of the root set its metadata; a trailing slash makes a '\0' file a
    # directory (but not a '0' file).
    "root": [
        (".", "d", None, {"mode": 0o700}),
        ("x", "f", b"x", {}),
        ("/", "d", None, {"mode": 0o750, "uid": 3}),
        ("t/", "a", b"", {}),
        ("t/u", "f", b"u", {}),
    ],
    "meta": [
        ("old", "f", b"before 1970", {"mtime": -86400}),
        ("future", "f", b"after 2106", {"mtime": 5_000_000_000}),
        ("ids", "f", b"big ids", {"uid": 70000, "gid": 2_000_000}),
        ("suid", "f", b"", {"mode": 0o4755}),
        ("xattr", "f", b"x", {"pax": {"SCHILY.xattr.user.k": "v", "SCHILY.xattr.security.capability": "c",
                                      "SCHILY.xattr.trusted.overlay.opaque": "y"}}),
        ("subsec", "f", b"", {"pax": {"mtime": "1600000000.123456789"}}),
        ("l" * 200, "f", b"long name", {}),
        ("deep/" * 30 + "leaf", "f", b"deep", {}),
        ("sym", "l", "t" * 300, {}),
    ],
}

HOSTILE = {
    "escape1": [("../evil", "f", b"x", {})],
    "escape2": [("a/../../evil", "f", b"x", {})],
    "escape3": [("../.wh.canary", "f", b"", {})],
    "wh-empty": [(".wh.", "f", b"", {})],
    "wh-dotdot": [("x/.wh..", "f", b"", {})],
    "wh-dotdotdot": [("x/.wh...", "f", b"", {})],
    "opq-root": [("./.wh..wh..opq", "f", b"", {})],
    "dotdot-inside": [("a/b/../c", "f", b"x", {})],
    "hl-dotdot": [("a", "f", b"x", {}), ("hl", "h", "d/../a", {})],
    "hl-whiteout": [(".wh.a", "f", b"", {}), ("hl", "h", "a", {})],
    "hl-missing": [("present", "f", b"x", {}), ("hl", "h", "no_such_target", {})],
    "hl-dir": [("d", "d", None, {}), ("hl", "h", "d", {})],
    "under-file": [("f", "f", b"file", {}), ("f/child", "f", b"x", {})],
    "under-link": [("d", "d", None, {}), ("s", "l", "d", {}), ("s/child", "f", b"x", {})],
    "under-abs-link": [("s", "l", "/etc", {}), ("s/child", "f", b"x", {})],
    "long-component": [("n" * 300, "f", b"x", {})],
    "root-file": [("./", "f", b"x", {})],
    "empty-symlink": [("s", "l", "", {})],
    "abs": [("/abs/path", "f", b"x", {})],
}


def tars():
    fmts = {"ustar": tarfile.USTAR_FORMAT, "gnu": tarfile.GNU_FORMAT, "pax": tarfile.PAX_FORMAT}
    made = {}
    for name, entries in list(LAYERS.items()) + list(HOSTILE.items()):
        for fname, fmt in fmts.items():
            try:
                b = tar_bytes(fmt, entries)
            except (ValueError, tarfile.TarError):
                continue  # not representable in that format (e.g. long names in ustar)
            made[f"{name}-{fname}.tar"] = b
    base = made["basic-ustar.tar"]
    # Stream damage, as in convert_bad_input.rs.
    made["trunc-mid-header.tar"] = base[:700]
    made["trunc-mid-data.tar"] = base[:1500]
    made["trunc-between.tar"] = base[:1024]
    bad = bytearray(base)
    bad[148] = ord("7")
    made["bad-checksum.tar"] = bytes(bad)
    big = bytearray(base)
    big[124:136] = b"77777777777\0"  # size far beyond the stream
    made["size-beyond-stream.tar"] = bytes(big)
    b256 = bytearray(base)
    b256[124:136] = bytes([0x80] + [0] * 7 + [0, 0, 0x10, 0])  # base-256 size
    made["base256-size.tar"] = bytes(b256)
    made["no-end-marker.tar"] = base[: len(base) - 1024]
    for k, v in made.items():
        out("tar", k, v)
    return made


def images(made, converter):
    tmp = tempfile.mkdtemp()
    try:
        n = 0
        for name in ("basic-pax.tar", "whiteouts-pax.tar", "replace-pax.tar", "meta-pax.tar", "basic-gnu.tar"):
            src = os.path.join(tmp, name)
            with open(src, "wb") as f:
                f.write(made[name])
            if converter:
                for opts in ([], ["--no-inline"], ["--meta-first"]):
                    img = os.path.join(tmp, "out.erofs")
                    r = subprocess.run([converter, "convert", *opts, src, img], capture_output=True)
                    if r.returncode == 0:
                        out("erofs_image", f"ours-{name}{''.join(opts)}.img", open(img, "rb").read())
                        n += 1
            if os.access(MKFS_194, os.X_OK):
                for opts in (["--tar=f"], ["--tar=f", "--aufs", "-Enoinline_data"], ["--tar=f", "--chunksize=4096"]):
                    img = os.path.join(tmp, "mk.erofs")
                    r = subprocess.run([MKFS_194, "--quiet", "-T0", *opts, img, src], capture_output=True)
                    if r.returncode == 0:
                        out("erofs_image", f"mkfs194-{name}{''.join(opts)}.img", open(img, "rb").read())
                        n += 1
            # mkfs.erofs from an unpacked directory (Debian's 1.5 has no --tar).
            d = os.path.join(tmp, "dir")
            shutil.rmtree(d, ignore_errors=True)
            os.makedirs(d)
            with tarfile.open(src) as t:
                for m in t.getmembers():
                    if m.isdev() or m.name.startswith("/") or ".." in m.name:
                        continue
                    try:
                        t.extract(m, d, set_attrs=False, filter="fully_trusted")
                    except Exception:
                        pass
            if shutil.which("mkfs.erofs"):
                img = os.path.join(tmp, "dir.erofs")
                r = subprocess.run(["mkfs.erofs", "-T0", img, d], capture_output=True)
                if r.returncode == 0:
                    out("erofs_image", f"mkfs-dir-{name}.img", open(img, "rb").read())
                    n += 1
        return n
    finally:
        shutil.rmtree(tmp)


def lazy():
    def desc(size, chunk, data_offset, prefetch=None, mt="application/vnd.erofs.layer.v1"):
        chunks = -(-size // chunk)
        raw = b"".join(hashlib.sha256(bytes([i % 256])).digest() for i in range(chunks))
        a = {
            "io.dedup-snapshotter.data-offset": str(data_offset),
            "io.dedup-snapshotter.chunk-size": str(chunk),
            "io.dedup-snapshotter.chunk-digests": base64.b64encode(raw).decode(),
        }
        if prefetch is not None:
            a["io.dedup-snapshotter.prefetch"] = prefetch
        return {"mediaType": mt, "digest": "sha256:" + "ab" * 32, "size": size, "annotations": a}

    manifests = {
        "one": [desc(3 * 4096 + 10, 4096, 8192, "3,2")],
        "exact": [desc(8 * 65536, 65536, 65536)],
        "oci-type": [desc(100, 4096, 0, mt="application/vnd.oci.image.layer.v1.erofs")],
        "tar": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": "sha256:" + "cd" * 32,
                 "size": 10}],
        "empty": [desc(0, 4096, 0)],
        "many": [desc(1 << 20, 4096, 1 << 16, ",".join(str(i) for i in range(0, 256, 7)))],
    }
    for k, layers in manifests.items():
        out("lazy_layer", k + ".json", json.dumps({"schemaVersion": 2, "layers": layers}).encode())
    spec = {
        "op": "register",
        "digest": "sha256:" + "ef" * 32,
        "size": 10000,
        "chunk_size": 4096,
        "chunk_digests": ["00" * 32] * 3,
        "prefetch": [2, 0],
        "source": {"registry": "127.0.0.1:5000", "repository": "x/y"},
    }
    out("lazy_layer", "register.json", json.dumps(spec).encode())


def filters():
    for i, f in enumerate([
        "name==foo",
        'labels."containerd.io/gc.root"',
        "labels.foo.bar!=baz,kind==committed",
        "parent~=^sha256:[a-f0-9]+$",
        'name~=/a.*b/,labels."x"==|y|',
        "kind==view\nname==a",
        "",
        'labels."a\\"b"==c',
        "name==a, parent==b",
    ]):
        out("filters", f"f{i}.txt", f.encode())


def main():
    converter = sys.argv[1] if len(sys.argv) > 1 else None
    shutil.rmtree(SEEDS, ignore_errors=True)
    made = tars()
    n = images(made, converter)
    lazy()
    filters()
    print(f"seeds: {len(made)} tars, {n} images", file=sys.stderr)


main()
