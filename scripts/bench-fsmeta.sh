#!/usr/bin/env bash
# Merged metadata (fsmeta) against the per-layer stack, on the minbase rootfs split into N layers.
#
#   sudo scripts/bench-fsmeta.sh [N ...]          (default: 1 16 64 128)
#
# For each N, the Debian bookworm minbase layer (crates/dedup-snapshotter/tests/fixtures/debian-minbase.sh)
# is split into N layer tars: directories in layer 0, every other entry in the layer its path hashes to, and
# from layer 1 on, whiteouts of two files of the layer below (so the stack's view is not the union; never programs
# or shared libraries, so containers of the image still run). Each is converted as the store converts layers
# (`convert --no-inline`), then, in one run, three ways to see the stack:
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
# baseline's (exit 1 otherwise).
#
# Then, same run, container start through containerd 2.1.9 (BENCH_FSMETA_CONTAINERD=0 skips it): two
# scripts/e2e-env.sh environments (E2E_CONTAINERD=2.1), started once before the first N, in WORK/ctrd-*:
#   per-layer   `dedup-snapshotter serve` as proxy snapshotter `dedup` (+ its Diff proxy), no merging;
#   merged      the same with `--merge-layers` (default --max-unmerged-layers 1: a chain of 2 or more layers gets
#               one merged EROFS lower, built at the first Prepare/View over the chain and removed with its last
#               user: with nothing else running on the image, every `ctr run --rm` builds it again);
#   overlayfs   containerd's built-in overlayfs snapshotter (walking differ), in the per-layer environment's
#               containerd.
# For each N the same N layer tars become an OCI image (umoci: `raw add-layer` of each tar, gzip; config Env PATH),
# imported from a tar of the layout with `ctr images import --snapshotter S` (unpacked for each snapshotter), then:
#   start first     wall time of `ctr run --rm --snapshotter S IMAGE ID /bin/true` (Prepare of the container's
#                   snapshot, mount, task start, wait, delete: ctr's whole run), the first after the import;
#   start warm      the same, median of REPS, each with a fresh container ID;
#   start cold      the same after `sync; echo 3 >/proc/sys/vm/drop_caches`, median of REPS;
#   start in-use    (merged only) the warm start while another container of the image runs (`sleep`), so the
#                   merged image is already mounted and not built; median of REPS.
# Before each start the snapshotter is waited back at rest (the last container's snapshot removed by containerd's
# GC: snapshot dirs and mounts under its root as after the import). Each config also runs one container that prints
# its root mount (the overlay's lowers are counted: per-layer N, merged 1 under ROOT/mm/ when N > 1, overlayfs N) and
# the manifest above of its rootfs (`find / -xdev`, sha256 of every file, inside the container); the three must be
# equal (exit 1 otherwise, after the tables are written). Targets printed, not asserted: start with 64 layers merged
# <= 0.5x per-layer; lookups and read-all merged <= 1.0x per-layer at every N. Warnings and errors in the daemons'
# logs (WORK/ctrd-*/logs) are counted in the report.
# Results: BENCH_DIR/fsmeta.md and fsmeta.json (BENCH_DIR defaults to target/bench; json keys N/config/metric,
# medians). Mounts, environments (e2e-env.sh stop) and files (WORK, under /var/tmp) are removed on exit. The
# machine's CPUs are shared: compare within a run.
set -euo pipefail
export LC_ALL=C
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${DEDUP_BIN:-$ROOT/target/release/dedup-snapshotter}
REPS=${BENCH_REPS:-3}
BENCH_DIR=${BENCH_DIR:-$ROOT/target/bench}
CTRD=${BENCH_FSMETA_CONTAINERD:-1}
NS=("$@")
[ ${#NS[@]} -gt 0 ] || NS=(1 16 64 128)
[ "$(id -u)" = 0 ] || { echo "bench-fsmeta: needs root (mounts)" >&2; exit 1; }
[ -x "$BIN" ] || { echo "bench-fsmeta: build first: cargo build --release ($BIN)" >&2; exit 1; }
LAYER=$(bash "$ROOT/crates/dedup-snapshotter/tests/fixtures/debian-minbase.sh")
mkdir -p "$BENCH_DIR"
WORK=$(mktemp -d /var/tmp/bench-fsmeta.XXXXXX)
cleanup() {
    local rc=$? e
    trap - EXIT INT TERM
    # The containerd environments first: their daemons hold mounts under WORK.
    for e in "$WORK"/ctrd-*; do
        [ -f "$e/env" ] || continue
        if ((rc)) && [ -z "$REPORTED" ] && [ -d "$e/logs" ]; then
            echo "bench-fsmeta: failed; last lines of $e/logs:" >&2
            tail -n 20 "$e"/logs/*.log >&2 || true
        fi
        "$ROOT/scripts/e2e-env.sh" stop "$e" >"$WORK/stop.log" 2>&1 ||
            echo "bench-fsmeta: e2e-env.sh stop $e: $(cat "$WORK/stop.log")" >&2
    done
    { grep -o " $WORK[^ ]*" /proc/self/mounts || true; } | sort -r | while read -r m; do umount -l "$m" 2>/dev/null || true; done
    rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
fail() { echo "bench-fsmeta: $*" >&2; exit 1; }
REPORTED= # set once the tables are written: a failure after that is a mismatch, not a crash
RAW=$WORK/raw.tsv
for f in "$RAW" "$WORK/manifests" "$WORK/ctr-manifests" "$WORK/lowers" "$WORK/notes"; do : >"$f"; done

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
import gzip, hashlib, io, os, re, sys, tarfile
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
# Two whiteouts per layer of files of the layer below, linked to nothing else, and neither programs nor shared
# libraries (usr/bin, usr/sbin, *.so*): the image's containers must still run /bin/true and the manifest's tools
# (at 128 layers the first two picked would include the dynamic loader and dash).
keep = re.compile(r"(^|/)usr/s?bin/|\.so(\.|$)")
for k in range(1, n):
    for name in [f for f in files[k - 1] if "/" in f and f not in linked and not keep.search(f)][:2]:
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

# --- Container start through containerd (BENCH_FSMETA_CONTAINERD=1) ---
# shellcheck disable=SC1091
ev() { ( . "$1/env"; printf '%s' "${!2}" ); } # ENVDIR KEY: a value of an e2e-env.sh env file
env_of() { case $1 in merged) echo "$WORK/ctrd-merged" ;; *) echo "$WORK/ctrd-per-layer" ;; esac; }
snap_of() { case $1 in overlayfs) echo overlayfs ;; *) echo dedup ;; esac; }
snapdir_of() {
    case $1 in
        overlayfs) echo "$WORK/ctrd-per-layer/containerd/root/io.containerd.snapshotter.v1.overlayfs" ;;
        *) echo "$(env_of "$1")/snapshotter" ;;
    esac
}
cx() { local c=$1; shift; "$CTR" -a "$(env_of "$c")/containerd.sock" -n bench "$@"; } # CFG ctr-args...
at_rest() { # CFG: the snapshotter's snapshot dirs and the mounts under its root
    local s
    s=$(snapdir_of "$1")
    echo "$(find "$s/snapshots" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l) $(grep -c " $s/" /proc/self/mounts || true)"
}
settle() { # CFG STATE: waits (up to 30 s) for the snapshotter to be back at STATE (containerd's GC removes the
    # last container's snapshot after `ctr run --rm` returns)
    local i
    for ((i = 0; i < 300; i++)); do
        [[ $(at_rest "$1") == "$2" ]] && return 0
        sleep 0.1
    done
    echo "bench-fsmeta: $1: the snapshotter is not back at rest ($2) after 30 s: $(at_rest "$1")" >&2
    echo "N=$n $1: the snapshotter did not come back at rest ($2 snapshot dirs, mounts) after 30 s: $(at_rest "$1")" >>"$WORK/notes"
}
start_once() { # CFG ID: one `ctr run --rm ... /bin/true`, timed whole; prints seconds
    local t0 t1
    t0=$(now)
    cx "$1" run --rm --snapshotter "$(snap_of "$1")" "$IMG" "$2" /bin/true >"$WORK/run.log" 2>&1 ||
        fail "N=$n $1: ctr run /bin/true failed: $(cat "$WORK/run.log")"
    t1=$(now)
    secs "$t0" "$t1"
}
rec() { printf '%s\t%s\t%s\t%s\n' "$@" >>"$RAW"; } # N CFG METRIC VALUE
# Inside the container: its root mount, then manifest()'s list and sums of the rootfs.
read -r -d '' MANIFEST_SH <<'SH' || true
grep ' / / ' /proc/self/mountinfo
echo ---
cd / && { find . -xdev ! -type d -printf '%y %m %U:%G %s %p %l\n'; find . -xdev -type d -printf '%y %m %U:%G %p\n'; } | LC_ALL=C sort
echo ---
find . -xdev -type f -print0 | LC_ALL=C sort -z | xargs -0 -r sha256sum
SH
lowers_of() { # FILE (MANIFEST_SH's output): "COUNT mm|-": the root overlay's lowers, "mm" if all are merged images
    head -n 1 "$1" | python3 -c '
import sys
line = sys.stdin.readline()
opts = line.split(" - ", 1)[1].split()[2].split(",") if " - " in line else []
lowers = []
for o in opts:
    if o.startswith("lowerdir="):
        lowers += o[len("lowerdir="):].split(":")
    elif o.startswith("lowerdir+="):
        lowers.append(o[len("lowerdir+="):])
print(len(lowers), "mm" if lowers and all("/mm/" in l for l in lowers) else "-")'
}

containerd_starts() { # N: the layer tars in $d/tars as an image, imported and started in every config
    local n=$1 lay=$d/oci k cfg r t base held lw mm ok
    IMG=bench/fsmeta-n$n:latest
    umoci init --layout "$lay"
    umoci new --image "$lay:latest"
    umoci config --image "$lay:latest" --config.env 'PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --config.cmd /bin/sh --config.workingdir /
    for ((k = 0; k < n; k++)); do
        umoci raw add-layer --history.created_by "bench-fsmeta layer $k of $n" --image "$lay:latest" "$d/tars/layer-$k.tar"
    done
    umoci gc --layout "$lay"
    tar -C "$lay" -cf "$d/oci.tar" .
    rm -rf "$lay" "$d/tars"
    for cfg in per-layer overlayfs merged; do
        cx "$cfg" images import --base-name "${IMG%:*}" --snapshotter "$(snap_of "$cfg")" "$d/oci.tar" \
            >"$WORK/import.log" 2>&1 || fail "N=$n $cfg: ctr images import: $(tail -n 20 "$WORK/import.log")"
    done
    rm -f "$d/oci.tar"
    for cfg in per-layer merged overlayfs; do
        base=$(at_rest "$cfg")
        [[ ${base%% *} == "$n" ]] || fail "N=$n $cfg: $n layers imported, but $(snapdir_of "$cfg")/snapshots holds ${base%% *}"
        t=$(start_once "$cfg" "s$n-$cfg-first")
        rec "$n" "$cfg" start_first "$t"
        for ((r = 1; r <= REPS; r++)); do
            settle "$cfg" "$base"
            t=$(start_once "$cfg" "s$n-$cfg-w$r")
            rec "$n" "$cfg" start_warm "$t"
        done
        for ((r = 1; r <= REPS; r++)); do
            settle "$cfg" "$base"
            drop
            t=$(start_once "$cfg" "s$n-$cfg-c$r")
            rec "$n" "$cfg" start_cold "$t"
        done
        if [[ $cfg == merged ]]; then
            # Another container of the image running: its merged image is mounted already.
            settle "$cfg" "$base"
            cx "$cfg" run -d --snapshotter dedup "$IMG" "s$n-hold" sleep 1000000 >"$WORK/run.log" 2>&1 ||
                fail "N=$n: ctr run -d sleep: $(cat "$WORK/run.log")"
            held=$(at_rest "$cfg")
            for ((r = 1; r <= REPS; r++)); do
                settle "$cfg" "$held"
                t=$(start_once "$cfg" "s$n-$cfg-u$r")
                rec "$n" "$cfg" start_inuse "$t"
            done
            cx "$cfg" tasks kill -s SIGKILL "s$n-hold" >/dev/null 2>&1 || true
            cx "$cfg" tasks rm -f "s$n-hold" >/dev/null 2>&1 || true
            cx "$cfg" containers rm "s$n-hold" >/dev/null 2>&1 || true
        fi
        settle "$cfg" "$base"
        cx "$cfg" run --rm --snapshotter "$(snap_of "$cfg")" "$IMG" "s$n-$cfg-manifest" sh -c "$MANIFEST_SH" \
            >"$WORK/n$n-ctr-$cfg.out" 2>"$WORK/run.log" || fail "N=$n $cfg: the manifest container failed: $(cat "$WORK/run.log")"
        read -r lw mm < <(lowers_of "$WORK/n$n-ctr-$cfg.out")
        rec "$n" "$cfg" lowers "$lw"
        echo "$n $cfg $lw $mm" >>"$WORK/lowers"
        case $cfg in
            merged) ok=$((n > 1 ? lw == 1 : lw == n)); [[ $n -le 1 || $mm == mm ]] || ok=0 ;;
            *) ok=$((lw == n)) ;;
        esac
        if ((!ok)); then
            echo "bench-fsmeta: N=$n $cfg: unexpected lowers ($lw, ${mm}); the container's root mount:" >&2
            head -n 1 "$WORK/n$n-ctr-$cfg.out" | cut -c1-600 >&2
            echo "N=$n $cfg: the container's root overlay has $lw lower(s)$([[ $mm == mm ]] && echo ", under mm/"), not as expected" >>"$WORK/notes"
        fi
        tail -n +2 "$WORK/n$n-ctr-$cfg.out" >"$WORK/n$n-ctr-$cfg.view"
        echo "$n $cfg $(sha256sum <"$WORK/n$n-ctr-$cfg.view" | cut -d' ' -f1)" >>"$WORK/ctr-manifests"
        settle "$cfg" "$base"
    done
    for cfg in per-layer merged; do
        if ! cmp -s "$WORK/n$n-ctr-overlayfs.view" "$WORK/n$n-ctr-$cfg.view"; then
            echo "bench-fsmeta: N=$n: the rootfs of a container on $cfg differs from one on overlayfs (< overlayfs, > $cfg):" >&2
            diff "$WORK/n$n-ctr-overlayfs.view" "$WORK/n$n-ctr-$cfg.view" | head -n 20 >&2 || true
        fi
    done
    cx per-layer images rm --sync "$IMG" >/dev/null
    cx merged images rm --sync "$IMG" >/dev/null
    for cfg in per-layer merged overlayfs; do settle "$cfg" "0 0"; done
}

CTR=
if [[ $CTRD == 1 ]]; then
    for t in umoci tar; do command -v "$t" >/dev/null || fail "$t missing (apt-get install -y $t), or BENCH_FSMETA_CONTAINERD=0"; done
    for cfg in per-layer merged; do
        cmd="$BIN serve --root {root} --address {socket}"
        [[ $cfg == per-layer ]] || cmd+=" --merge-layers"
        E2E_CONTAINERD=2.1 "$ROOT/scripts/e2e-env.sh" start "$WORK/ctrd-$cfg" "$cmd" >"$WORK/start-$cfg.log" 2>&1 ||
            fail "e2e-env.sh start ($cfg): $(tail -n 20 "$WORK/start-$cfg.log")"
    done
    CTR=$(ev "$WORK/ctrd-per-layer" E2E_CTR)
    echo "bench-fsmeta: containerd $(ev "$WORK/ctrd-per-layer" E2E_CONTAINERD_VERSION) in $WORK/ctrd-{per-layer,merged}" >&2
fi

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
    rm -rf "$d/img" "$d/dirs"
    if [[ $CTRD == 1 ]]; then containerd_starts "$n"; fi
    echo "bench-fsmeta: N=$n done" >&2
    rm -rf "$d"
done

if [[ $CTRD == 1 ]]; then
    for cfg in per-layer merged; do
        l=$WORK/ctrd-$cfg/logs/snapshotter.log
        errs=$(sed 's/\x1b\[[0-9;]*m//g' "$l" | grep -E '^[^ ]+ +(ERROR|WARN) ' || true)
        if [[ -n $errs ]]; then
            echo "bench-fsmeta: the $cfg daemon logged $(wc -l <<<"$errs") warning(s)/error(s), first ones:" >&2
            head -n 10 <<<"$errs" >&2
            echo "the $cfg daemon logged $(wc -l <<<"$errs") warning(s)/error(s); first: $(head -n 1 <<<"$errs" | cut -c1-300)" >>"$WORK/notes"
        fi
    done
fi

REPORTED=1
python3 - "$RAW" "$WORK/manifests" "$BENCH_DIR" "$WORK/ctr-manifests" "$WORK/lowers" "$WORK/notes" "$CTRD" <<'PY'
import collections, json, statistics, sys
raw, manifests, out, ctr_manifests, lowers_file, notes_file, ctrd = sys.argv[1:]
s = collections.defaultdict(list)
for line in open(raw):
    n, kind, metric, v = line.split("\t")
    s[(int(n), kind, metric)].append(float(v))
med = {k: statistics.median(v) for k, v in s.items()}
ok = True
def differ(path, what):
    global ok
    sums = collections.defaultdict(dict)
    for line in open(path):
        n, kind, h = line.split()
        sums[int(n)][kind] = h
    bad = []
    for n, d in sorted(sums.items()):
        if len(set(d.values())) != 1:
            ok = False
            bad.append(n)
            print(f"bench-fsmeta: N={n}: the {what} differ: {d}", file=sys.stderr)
    return bad
bad_views = differ(manifests, "views")
bad_ctr = differ(ctr_manifests, "containers' rootfs")
ns = sorted({k[0] for k in med})
md = ["# Merged metadata vs per-layer EROFS vs overlayfs (minbase split into N layers)", "",
      "Medians; seconds; ratios are merged / per-layer. Views " +
      ("identical for every N." if not bad_views else f"DIFFER for N = {bad_views} (see stderr)."), "",
      "| N | merge | mount per-layer / merged / overlayfs | stat cold p-l / merged (ratio) | stat warm p-l / merged (ratio) | read cold p-l / merged (ratio) | read warm p-l / merged (ratio) |",
      "|---:|---:|---|---|---|---|---|"]
def g(n, k, m): return med.get((n, k, m), float("nan"))
def ratio(a, b): return b / a if a == a and b == b and a > 0 else float("nan")
for n in ns:
    cells = [str(n), f"{g(n,'merged','merge'):.3f}",
             f"{g(n,'per-layer','mount'):.3f} / {g(n,'merged','mount'):.3f} / {g(n,'overlayfs','mount'):.3f}"]
    for m in ("stat_cold", "stat_warm", "read_cold", "read_warm"):
        a, b = g(n, "per-layer", m), g(n, "merged", m)
        cells.append(f"{a:.3f} / {b:.3f} ({ratio(a, b):.2f})")
    md.append("| " + " | ".join(cells) + " |")
targets = []
if ctrd == "1":
    lowers = collections.defaultdict(dict)
    for line in open(lowers_file):
        n, cfg, count, mm = line.split()
        lowers[int(n)][cfg] = count + (" (mm)" if mm == "mm" else "")
    md += ["", "## Container start through containerd", "",
           "`ctr run --rm --snapshotter S IMAGE ID /bin/true`, timed whole (Prepare, mount, start, wait, delete), "
           "containerd 2.1; per-layer and merged: dedup-snapshotter as proxy `dedup`, without and with `--merge-layers` "
           "(each run builds the merged image again: it is removed with its last user); overlayfs: containerd's own. "
           "Medians; seconds; ratios are merged / per-layer. first: the first start after the import; cold: after "
           "drop_caches; in use: merged, while another container of the image runs (merged image already mounted). "
           "Lowers: the container's root overlay's lower dirs ((mm): one merged image). Containers' rootfs "
           + ("identical in the three configs for every N." if not bad_ctr else f"DIFFER for N = {bad_ctr} (see stderr)."), "",
           "| N | lowers p-l / merged / overlayfs | start first p-l / merged / overlayfs | start warm p-l / merged / overlayfs (ratio) | start cold p-l / merged / overlayfs (ratio) | start warm in use: merged (ratio to p-l warm) |",
           "|---:|---|---|---|---|---|"]
    for n in ns:
        lw = lowers.get(n, {})
        cells = [str(n), " / ".join(lw.get(c, "?") for c in ("per-layer", "merged", "overlayfs")),
                 " / ".join(f"{g(n, c, 'start_first'):.3f}" for c in ("per-layer", "merged", "overlayfs"))]
        for m in ("start_warm", "start_cold"):
            cells.append(" / ".join(f"{g(n, c, m):.3f}" for c in ("per-layer", "merged", "overlayfs")) +
                         f" ({ratio(g(n, 'per-layer', m), g(n, 'merged', m)):.2f})")
        cells.append(f"{g(n, 'merged', 'start_inuse'):.3f} ({ratio(g(n, 'per-layer', 'start_warm'), g(n, 'merged', 'start_inuse')):.2f})")
        md.append("| " + " | ".join(cells) + " |")
    for m in ("start_warm", "start_cold"):
        if (64, "per-layer", m) in med:
            r = ratio(g(64, "per-layer", m), g(64, "merged", m))
            targets.append(f"{m.replace('_', ' ')}, 64 layers, merged / per-layer: {r:.2f} (target <= 0.5: {'met' if r <= 0.5 else 'NOT met'})")
        else:
            targets.append(f"{m.replace('_', ' ')}, 64 layers: not measured (N=64 not run)")
for n in ns:
    rs = {m: ratio(g(n, "per-layer", m), g(n, "merged", m)) for m in ("stat_cold", "stat_warm", "read_cold", "read_warm")}
    worst = max(rs, key=lambda m: rs[m])
    targets.append(f"N={n}: lookups and read-all, merged / per-layer: " + ", ".join(f"{m.replace('_', ' ')} {r:.2f}" for m, r in rs.items())
                   + f" (target <= 1.0 each: {'met' if rs[worst] <= 1.0 else 'NOT met, ' + worst.replace('_', ' ')})")
md += ["", "Targets (printed, not asserted):", ""] + [f"- {t}" for t in targets]
notes = [l.rstrip("\n") for l in open(notes_file) if l.strip()]
if notes:
    md += ["", "Notes:", ""] + [f"- {l}" for l in notes]
open(f"{out}/fsmeta.md", "w").write("\n".join(md) + "\n")
json.dump({f"{k[0]}/{k[1]}/{k[2]}": v for k, v in med.items()}, open(f"{out}/fsmeta.json", "w"), indent=1)
print("\n".join(md))
sys.exit(0 if ok else 1)
PY
