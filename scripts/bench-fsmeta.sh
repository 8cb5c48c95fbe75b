#!/usr/bin/env bash
# Merged metadata (fsmeta) against the per-layer stack, on the minbase rootfs split into N layers.
#
#   sudo scripts/bench-fsmeta.sh [N ...]          (default: 1 16 64 128)
#
# For each N, the Debian bookworm minbase layer (crates/dedup-snapshotter/tests/fixtures/debian-minbase.sh)
# is split into N layer tars: directories in layer 0, every other entry in the layer its path hashes to, and
# from layer 1 on, whiteouts of two files of the layer below (so the stack's view is not the union). Each is
# converted as the store converts layers (`convert --no-inline`), then, in one run, three ways to see the stack:
#   per-layer   the layers mounted one by one (file-backed EROFS) under one read-only overlayfs, as the store
#               mounts a chain today;
#   merged      `dedup-snapshotter merge` of the chain, mounted once with the layers as extra devices (new
#               mount API), under a read-only overlayfs with that one lower, as a store would mount it;
#   overlayfs   containerd's overlayfs snapshotter's form: the N layers extracted to directories under one
#               read-only overlayfs (the baseline).
# Measured (medians of REPS, default 3, or BENCH_REPS):
#   merge       wall time of `merge` (fsync included);
#   mount       wall time to mount the stack (all EROFS mounts and the overlay);
#   stat cold   lstat of every path of the view (~6,800), after drop_caches and a fresh mount;
#   stat warm   the same again;
#   read cold   every regular file read (`find -type f -exec cat`), after drop_caches and a fresh mount;
#   read warm   the same again.
# Every view's manifest (type, mode, owner, size, sha256 of files, link targets) must equal the overlayfs
# baseline's (exit 1 otherwise). Results: BENCH_DIR/fsmeta.md and fsmeta.json (BENCH_DIR defaults to
# target/bench). Mounts and files are removed on exit. The machine's CPUs are shared: compare within a run.
set -euo pipefail
export LC_ALL=C
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${DEDUP_BIN:-$ROOT/target/release/dedup-snapshotter}
REPS=${BENCH_REPS:-3}
BENCH_DIR=${BENCH_DIR:-$ROOT/target/bench}
NS=("$@")
[ ${#NS[@]} -gt 0 ] || NS=(1 16 64 128)
[ "$(id -u)" = 0 ] || { echo "bench-fsmeta: needs root (mounts)" >&2; exit 1; }
[ -x "$BIN" ] || { echo "bench-fsmeta: build first: cargo build --release ($BIN)" >&2; exit 1; }
LAYER=$(bash "$ROOT/crates/dedup-snapshotter/tests/fixtures/debian-minbase.sh")
mkdir -p "$BENCH_DIR"
WORK=$(mktemp -d /var/tmp/bench-fsmeta.XXXXXX)
cleanup() {
    { grep -o " $WORK[^ ]*" /proc/self/mounts || true; } | sort -r | while read -r m; do umount -l "$m" 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT
RAW=$WORK/raw.tsv
: >"$RAW"

# mount_stack VIEW LOWER... : mounts, in one process and timed there (printed, seconds), each LOWER given as
# IMAGE@MOUNTPOINT[@DEVICE,...] (file-backed EROFS through the new mount API, fsopen/fsconfig/fsmount/
# move_mount, as the snapshotter mounts layers with devices) or as a plain directory, then VIEW: a read-only
# bind of a single lower, or a read-only overlayfs of all (first = top).
mount_stack() {
    python3 - "$@" <<'PY'
import ctypes, os, sys, time
libc = ctypes.CDLL(None, use_errno=True)
def check(r, what):
    if r < 0:
        e = ctypes.get_errno(); sys.exit(f"{what}: {os.strerror(e)}")
    return r
view, lowers = sys.argv[1], sys.argv[2:]
t0 = time.perf_counter()
dirs = []
for spec in lowers:
    if "@" not in spec:
        dirs.append(spec); continue
    image, target, *rest = spec.split("@")
    fd = check(libc.syscall(430, b"erofs", 1), "fsopen")
    check(libc.syscall(431, fd, 1, b"source", image.encode(), 0), "fsconfig source")
    for d in (rest[0].split(",") if rest and rest[0] else []):
        check(libc.syscall(431, fd, 1, b"device", d.encode(), 0), f"fsconfig device={d}")
    check(libc.syscall(431, fd, 0, b"ro", None, 0), "fsconfig ro")
    check(libc.syscall(431, fd, 6, None, None, 0), "fsconfig create")
    mfd = check(libc.syscall(432, fd, 1, 1), "fsmount")
    check(libc.syscall(429, mfd, b"", -100, target.encode(), 4), "move_mount")
    os.close(mfd); os.close(fd)
    dirs.append(target)
MS_RDONLY, MS_BIND = 1, 4096
if len(dirs) == 1:
    check(libc.mount(dirs[0].encode(), view.encode(), None, MS_BIND, None), "bind")
    check(libc.mount(None, view.encode(), None, MS_BIND | 32 | MS_RDONLY, None), "remount ro")  # MS_REMOUNT
else:
    # Relative to their common parent, as the store keeps them short (ROOT/m/<id>): 128 absolute
    # paths would not fit overlayfs's one-page option string.
    base = os.path.commonpath(dirs)
    os.chdir(base)
    opts = ("lowerdir=" + ":".join(os.path.relpath(d, base) for d in dirs)).encode()
    check(libc.mount(b"overlay", view.encode(), b"overlay", MS_RDONLY, opts), "overlay")
print(f"{time.perf_counter() - t0:.4f}")
PY
}

now() { date +%s%N; }
secs() { python3 -c "print(f'{($2 - $1) / 1e9:.4f}')" "$1" "$2"; }
drop() { sync; echo 3 >/proc/sys/vm/drop_caches; }

split_layers() { # N DIR: writes DIR/layer-K.tar for K in 0..N-1
    python3 - "$LAYER" "$1" "$2" <<'PY'
import gzip, hashlib, io, os, sys, tarfile
src, n, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
tars = [tarfile.open(os.path.join(out, f"layer-{k}.tar"), "w", format=tarfile.PAX_FORMAT) for k in range(n)]
files = [[] for _ in range(n)]
owner = {}
linked = set()
with tarfile.open(src, "r:gz") as t:
    for m in t:
        if m.isdir():
            k = 0
        elif m.islnk():
            # A hard link goes with its target's layer.
            k = owner.get(m.linkname, 0)
        else:
            k = int(hashlib.sha256(m.name.encode()).hexdigest(), 16) % n
        owner[m.name] = k
        tars[k].addfile(m, t.extractfile(m) if m.isreg() else None)
        if m.isreg():
            files[k].append(m.name)
        if m.islnk():
            linked.add(m.linkname)
# Two whiteouts per layer of files of the layer below, linked to nothing else.
for k in range(1, n):
    for name in [f for f in files[k - 1] if "/" in f and f not in linked][:2]:
        d, b = name.rsplit("/", 1)
        wh = tarfile.TarInfo(f"{d}/.wh.{b}")
        wh.size = 0
        tars[k].addfile(wh, io.BytesIO(b""))
for t in tars:
    t.close()
PY
}

manifest() { # DIR OUT: type, mode, owner, size, content digest of every entry
    # Directory sizes are the file system's own (EROFS's exact, ext4's in blocks): left out.
    (cd "$1" && { find . -xdev ! -type d -printf '%y %m %U:%G %s %p %l\n'; find . -xdev -type d -printf '%y %m %U:%G %p\n'; } | sort) >"$2.list"
    (cd "$1" && find . -xdev -type f -print0 | sort -z | xargs -0 -r sha256sum) >"$2.sums"
    cat "$2.list" "$2.sums" | sha256sum | cut -d' ' -f1
}

for n in "${NS[@]}"; do
    d=$WORK/n$n
    mkdir -p "$d/tars" "$d/img" "$d/dirs" "$d/m"
    split_layers "$n" "$d/tars"
    lowers=()
    for ((k = 0; k < n; k++)); do
        "$BIN" convert --no-inline "$d/tars/layer-$k.tar" "$d/img/$k.erofs" >/dev/null
        mkdir -p "$d/dirs/$k"
        tar -xpf "$d/tars/layer-$k.tar" -C "$d/dirs/$k" --numeric-owner 2>/dev/null || true
        # OCI whiteouts as overlayfs whiteouts, as containerd's overlayfs snapshotter's applier makes them.
        find "$d/dirs/$k" -name '.wh.*' | while read -r w; do
            b=$(basename "$w"); rm -f "$w"; mknod "$(dirname "$w")/${b#.wh.}" c 0 0
        done
    done
    layers=()
    for ((k = 0; k < n; k++)); do layers+=("$d/img/$k.erofs"); done
    for ((r = 1; r <= REPS; r++)); do
        rm -f "$d/merged.erofs"
        t0=$(now); "$BIN" merge "$d/merged.erofs" "${layers[@]}" >/dev/null; t1=$(now)
        printf '%s\tmerged\tmerge\t%s\n' "$n" "$(secs "$t0" "$t1")" >>"$RAW"
    done
    mapfile -t devs < <("$BIN" merge --json "$d/merged.erofs" "${layers[@]}" | python3 -c 'import json,sys; print("\n".join(json.load(sys.stdin)["devices"]))')

    setup() { # KIND: mounts the view at $d/view, prints the mount time
        local kind=$1 lo=() k
        mkdir -p "$d/view"
        case $kind in
            per-layer)
                for ((k = n - 1; k >= 0; k--)); do mkdir -p "$d/m/$k"; lo+=("$d/img/$k.erofs@$d/m/$k"); done ;;
            merged)
                mkdir -p "$d/m/merged"; lo=("$d/merged.erofs@$d/m/merged@$(IFS=,; echo "${devs[*]}")") ;;
            overlayfs)
                for ((k = n - 1; k >= 0; k--)); do lo+=("$d/dirs/$k"); done ;;
        esac
        mount_stack "$d/view" "${lo[@]}"
    }
    teardown() {
        umount "$d/view"
        { grep -o " $d/m/[^ ]*" /proc/self/mounts || true; } | sort -r | while read -r m; do umount "$m"; done
    }
    for kind in overlayfs per-layer merged; do
        setup "$kind" >/dev/null
        sum=$(manifest "$d/view" "$WORK/n$n-$kind")
        teardown
        echo "$n $kind $sum" >>"$WORK/manifests"
        if [[ $kind != overlayfs ]] && ! cmp -s "$WORK/n$n-overlayfs.list" "$WORK/n$n-$kind.list"; then
            echo "bench-fsmeta: N=$n: $kind's tree differs from overlayfs's:" >&2
            diff "$WORK/n$n-overlayfs.list" "$WORK/n$n-$kind.list" | head -n 20 >&2 || true
        fi
        for ((r = 1; r <= REPS; r++)); do
            drop
            mt=$(setup "$kind")
            printf '%s\t%s\tmount\t%s\n' "$n" "$kind" "$mt" >>"$RAW"
            find "$d/view" -xdev >"$d/paths"
            # The listing warmed the caches: a fresh mount after drop_caches for the cold lookups.
            teardown; drop; setup "$kind" >/dev/null
            for temp in cold warm; do
                st=$(python3 -c 'import os, sys, time
ps = [p.rstrip("\n") for p in open(sys.argv[1])]
t = time.perf_counter()
for p in ps:
    os.lstat(p)
print(f"{time.perf_counter() - t:.4f}")' "$d/paths")
                printf '%s\t%s\tstat_%s\t%s\n' "$n" "$kind" "$temp" "$st" >>"$RAW"
            done
            teardown; drop; setup "$kind" >/dev/null
            for temp in cold warm; do
                t0=$(now); find "$d/view" -xdev -type f -exec cat {} + >/dev/null; t1=$(now)
                printf '%s\t%s\tread_%s\t%s\n' "$n" "$kind" "$temp" "$(secs "$t0" "$t1")" >>"$RAW"
            done
            teardown
        done
    done
    echo "bench-fsmeta: N=$n done" >&2
    rm -rf "$d"
done

python3 - "$RAW" "$WORK/manifests" "$BENCH_DIR" <<'PY'
import collections, json, statistics, sys
raw, manifests, out = sys.argv[1:]
s = collections.defaultdict(list)
for line in open(raw):
    n, kind, metric, v = line.split("\t")
    s[(int(n), kind, metric)].append(float(v))
med = {k: statistics.median(v) for k, v in s.items()}
ok = True
sums = collections.defaultdict(dict)
for line in open(manifests):
    n, kind, h = line.split()
    sums[int(n)][kind] = h
for n, d in sums.items():
    if len(set(d.values())) != 1:
        ok = False
        print(f"bench-fsmeta: N={n}: the views differ: {d}", file=sys.stderr)
ns = sorted({k[0] for k in med})
md = ["# Merged metadata vs per-layer EROFS vs overlayfs (minbase split into N layers)", "",
      "Medians; seconds; ratios are merged / per-layer. Views " + ("identical for every N." if ok else "DIFFER (see stderr)."), "",
      "| N | merge | mount per-layer / merged / overlayfs | stat cold p-l / merged (ratio) | stat warm p-l / merged (ratio) | read cold p-l / merged (ratio) | read warm p-l / merged (ratio) |",
      "|---:|---:|---|---|---|---|---|"]
def g(n, k, m): return med.get((n, k, m), float("nan"))
for n in ns:
    cells = [str(n), f"{g(n,'merged','merge'):.3f}",
             f"{g(n,'per-layer','mount'):.3f} / {g(n,'merged','mount'):.3f} / {g(n,'overlayfs','mount'):.3f}"]
    for m in ("stat_cold", "stat_warm", "read_cold", "read_warm"):
        a, b = g(n, "per-layer", m), g(n, "merged", m)
        cells.append(f"{a:.3f} / {b:.3f} ({b / a:.2f})")
    md.append("| " + " | ".join(cells) + " |")
open(f"{out}/fsmeta.md", "w").write("\n".join(md) + "\n")
json.dump({f"{k[0]}/{k[1]}/{k[2]}": v for k, v in med.items()}, open(f"{out}/fsmeta.json", "w"), indent=1)
print("\n".join(md))
sys.exit(0 if ok else 1)
PY
